// The CUDA engine: the Engine interface (csrc/engine/engine.h) on one NVIDIA GPU.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "../engine/engine.h"

namespace pyllm {

// Uploads the weights once (repacked, q/k/v and gate/up stacked where they
// share a layout) and keeps the KV cache on the current device.
std::unique_ptr<Engine> make_cuda_engine(const TensorTable& tensors, const ModelConfig& config,
                                         const std::map<std::string, LinearSpec>& linears, int64_t context_length);

// Number of CUDA devices this process can use (0 without a driver or device).
int cuda_device_count();

}  // namespace pyllm
