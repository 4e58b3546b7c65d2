// hla — linear and hybrid attention. Umbrella header.
#pragma once

#include "hla/dtype.hpp"
#include "hla/error.hpp"
#include "hla/linear.hpp"
#include "hla/softmax.hpp"
#include "hla/tensor.hpp"
#include "hla/threading.hpp"
