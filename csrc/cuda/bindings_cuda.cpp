// The CUDA module's registrations: torch_bindings.cpp's CUDA half (a separate object file, so
// the two extension modules never share one).
#define BERDIFF_CUDA_MODULE
#include "../torch_bindings.cpp"
