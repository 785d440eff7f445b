"""Benchmark entry point; the code lives in jax_etap.bench (also `python -m jax_etap.bench`)."""

from jax_etap.bench import main

if __name__ == "__main__":
    main()
