// hla — softmax-family kernels for head dim 128 (explicit instantiation; see launchers.cuh).
#define HLA_SOFTMAX_INSTANTIATE 128
#include "ops/softmax/cuda/launchers.cuh"
