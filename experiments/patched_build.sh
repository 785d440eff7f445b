# Sourced by ab_run.sh and wide_clock.sh.
# start_patched_build SRC TARGET LOG PATCH...: copies the tree (the current directory,
# without its build outputs) to SRC, applies each PATCH there in order, and starts
# installing that copy into TARGET (pip --target) in the background, its output in LOG;
# $! is then the install's pid. JAX_ETAP_CUDA (default ON) is passed on to the build.
start_patched_build() {
  local src=$1 target=$2 log=$3 patch
  shift 3
  mkdir -p "$src"
  tar --exclude=./build --exclude=./device_out --exclude=./.git -cf - . | tar -xf - -C "$src"
  for patch in "$@"; do git -C "$src" apply "$patch"; done
  JAX_ETAP_CUDA=${JAX_ETAP_CUDA:-ON} python3 -m pip install --no-build-isolation --no-deps -v --target "$target" "$src" \
    >"$log" 2>&1 &
}
