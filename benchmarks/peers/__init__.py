"""Other implementations run beside jax_etap in the same process, and the ceilings they are
measured against. Each module imports torch only inside its functions, so this package
imports on a machine without torch or a GPU."""
