# JAX_ETAP_CUDA=WHEELS: nvcc, its headers and the static CUDA runtime come from NVIDIA's
# wheels (nvidia-cuda-nvcc and friends), which the build backend installed into the build's
# Python environment (build_backend/jax_etap_backend.py). They unpack into one folder,
# site-packages/nvidia/cu13, laid out like a toolkit except that its libraries sit in lib/,
# where nvcc's own profile looks for lib64/: LIBRARY_PATH points its link steps there.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import nvidia, os; print(next(p for p in (os.path.join(d, 'cu13') for d in nvidia.__path__) if os.path.isfile(os.path.join(p, 'bin', 'nvcc'))))"
  OUTPUT_VARIABLE jax_etap_cuda_root OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE jax_etap_cuda_root_result)
if(NOT jax_etap_cuda_root_result EQUAL 0)
  message(FATAL_ERROR "JAX_ETAP_CUDA=wheels, but ${Python_EXECUTABLE} has no nvidia/cu13/bin/nvcc: "
                      "install through pip (its build backend adds the nvidia-cuda-nvcc wheels), or "
                      "pip install nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl "
                      "(13.0) into the build environment.")
endif()
set(CMAKE_CUDA_COMPILER "${jax_etap_cuda_root}/bin/nvcc")
set(CUDAToolkit_ROOT "${jax_etap_cuda_root}")
set(ENV{LIBRARY_PATH} "${jax_etap_cuda_root}/lib:$ENV{LIBRARY_PATH}")
message(STATUS "jax_etap: CUDA compiler from the nvidia-cuda-nvcc wheels: ${CMAKE_CUDA_COMPILER}")
# FindCUDAToolkit insists on finding the shared runtime as plain libcudart.so, which the
# wheel ships only under its versioned name; the extension links the static runtime anyway.
set(CUDA_CUDART "${jax_etap_cuda_root}/lib/libcudart.so.13" CACHE FILEPATH "CUDA runtime (nvidia-cuda-runtime wheel)")
