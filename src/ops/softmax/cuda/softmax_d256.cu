// hla — softmax-family kernels for head dim 256 (explicit instantiation; see launchers.cuh).
#define HLA_SOFTMAX_INSTANTIATE 256
#include "ops/softmax/cuda/launchers.cuh"
