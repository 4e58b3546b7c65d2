// hla — this thread's CUDA stream (see hla/tensor.hpp). Plain C++: the stream is only stored here;
// the CUDA sources read it back through cuda_stream().
#include "hla/tensor.hpp"

namespace hla {

namespace {
// One per thread, like PyTorch's current stream: two threads driving two streams never see each
// other's choice.
thread_local void* current_stream = nullptr;
}  // namespace

void set_cuda_stream(void* stream) { current_stream = stream; }
void* cuda_stream() { return current_stream; }

}  // namespace hla
