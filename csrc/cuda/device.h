// CUDA runtime helpers shared by the kernels, the engine and the bindings:
// error checks that throw, and an owning device buffer.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyllm {
namespace cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
    throw std::runtime_error(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                             "): " + cudaGetErrorString(err));
}

#define PYLLM_CUDA_CHECK(call)                                                            \
    do {                                                                                  \
        cudaError_t pyllm_err_ = (call);                                                  \
        if (pyllm_err_ != cudaSuccess) ::pyllm::cuda::throw_cuda_error(pyllm_err_, #call, __FILE__, __LINE__); \
    } while (0)

// After every kernel launch: a bad launch configuration shows up here.
#define PYLLM_CUDA_CHECK_LAUNCH(name) PYLLM_CUDA_CHECK(cudaPeekAtLastError())

// Device memory owned by one object (move-only).
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes) { resize(bytes); }
    ~DeviceBuffer() { release(); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
        if (this != &other) {
            release();
            ptr_ = std::exchange(other.ptr_, nullptr);
            bytes_ = std::exchange(other.bytes_, 0);
        }
        return *this;
    }

    // Discards the contents; a no-op when already at least this large.
    void reserve(size_t bytes) {
        if (bytes > bytes_) resize(bytes);
    }
    void resize(size_t bytes) {
        release();
        if (bytes == 0) return;
        PYLLM_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
        bytes_ = bytes;
    }
    void upload(const void* host, size_t bytes) {
        resize(bytes);
        if (bytes) PYLLM_CUDA_CHECK(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice));
    }
    template <typename T>
    T* as() const { return static_cast<T*>(ptr_); }
    size_t bytes() const { return bytes_; }

private:
    void release() {
        if (ptr_) cudaFree(ptr_);
        ptr_ = nullptr;
        bytes_ = 0;
    }
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

}  // namespace cuda
}  // namespace pyllm
