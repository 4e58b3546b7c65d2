// hla — softmax-family kernels for head dim 64 (explicit instantiation; see launchers.cuh).
#define HLA_SOFTMAX_INSTANTIATE 64
#include "ops/softmax/cuda/launchers.cuh"
