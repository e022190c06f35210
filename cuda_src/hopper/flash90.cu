// The sm90a flash forward kernel (hopper/fwd_kernel.cuh). cupy_paged/backends/_flash90.py
// generates one extern "C" entry per instantiation after this include.
#include "hopper/fwd_kernel.cuh"
