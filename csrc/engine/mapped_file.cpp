#include "mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "../core/checked.h"

namespace pyllm {

MappedFile::MappedFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // never block on a FIFO
    if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        const int err = errno;
        ::close(fd);
        throw std::runtime_error("cannot stat " + path + ": " + std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw std::invalid_argument(path + " is not a regular file");
    }
    size_ = (uint64_t)st.st_size;
    if (size_ == 0) {
        ::close(fd);
        throw std::invalid_argument(path + " is empty");
    }
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    const int err = errno;
    ::close(fd);
    if (p == MAP_FAILED) throw std::runtime_error("cannot map " + path + ": " + std::strerror(err));
    data_ = static_cast<const uint8_t*>(p);
}

MappedFile::~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

void MappedFile::release(const void* p, uint64_t n) const {
    const uint64_t page = (uint64_t)::sysconf(_SC_PAGESIZE);
    const uint64_t begin = ((uint64_t)(uintptr_t)p + page - 1) / page * page;
    const uint64_t end = ((uint64_t)(uintptr_t)p + n) / page * page;
    const uint64_t map_begin = (uint64_t)(uintptr_t)data_, map_end = map_begin + size_;
    if (end <= begin || begin < map_begin || end > map_end) return;
    ::madvise((void*)(uintptr_t)begin, (size_t)(end - begin), MADV_DONTNEED);  // advice: failure is harmless
}

int64_t dtype_size(DType t) {
    switch (t) {
        case DType::F32:
        case DType::I32: return 4;
        case DType::F16:
        case DType::BF16: return 2;
        case DType::I8:
        case DType::U8: return 1;
    }
    return 0;
}

DType dtype_from_name(const std::string& name) {
    if (name == "F32") return DType::F32;
    if (name == "F16") return DType::F16;
    if (name == "BF16") return DType::BF16;
    if (name == "I8") return DType::I8;
    if (name == "U8") return DType::U8;
    if (name == "I32") return DType::I32;
    throw std::invalid_argument("unsupported tensor dtype '" + name + "'");
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

TensorTable::TensorTable(const MappedFile& file, uint64_t data_offset) : file_(file), data_offset_(data_offset) {
    if (data_offset > file.size()) throw std::invalid_argument("data section starts past the end of the file");
}

void TensorTable::add(const std::string& name, const std::string& dtype_name, const std::vector<int64_t>& shape,
                      uint64_t begin, uint64_t end) {
    auto fail = [&](const std::string& why) { throw std::invalid_argument("tensor '" + name + "': " + why); };
    if (tensors_.count(name)) fail("listed twice");
    DType dtype = DType::U8;
    try {
        dtype = dtype_from_name(dtype_name);
    } catch (const std::invalid_argument& e) {
        fail(e.what());
    }
    uint64_t count = 1;
    for (int64_t d : shape) {
        if (d < 0) fail("negative dimension in shape " + shape_str(shape));
        if (__builtin_mul_overflow(count, (uint64_t)d, &count)) fail("shape " + shape_str(shape) + " overflows");
    }
    int64_t numel = 0, nbytes = 0;
    try {
        if (count > (uint64_t)INT64_MAX) throw std::length_error("element count");
        numel = (int64_t)count;
        nbytes = checked_mul(numel, dtype_size(dtype), "tensor bytes");
    } catch (const std::length_error&) {
        fail("byte size overflows");
    }
    if (end < begin) fail("end offset before begin offset");
    if (end - begin != (uint64_t)nbytes)
        fail("holds " + std::to_string(end - begin) + " bytes but " + dtype_name + " " + shape_str(shape) + " needs " +
             std::to_string(nbytes));
    const uint64_t available = file_.size() - data_offset_;
    if (begin > available || end > available)
        fail("bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ") lie past the end of the file (" +
             std::to_string(available) + " data bytes); is the file truncated?");
    const uint8_t* p = file_.data() + data_offset_ + begin;
    if ((uintptr_t)p % (uintptr_t)dtype_size(dtype) != 0) fail("data is not aligned to its element size");
    tensors_[name] = TensorRef{dtype, shape, p, numel};
}

const TensorRef& TensorTable::get(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) throw std::invalid_argument("model file lacks tensor '" + name + "'");
    const TensorRef& t = it->second;
    if (t.dtype != dtype) throw std::invalid_argument("tensor '" + name + "' has an unexpected dtype");
    if (t.shape != shape)
        throw std::invalid_argument("tensor '" + name + "' has shape " + shape_str(t.shape) + ", expected " +
                                    shape_str(shape));
    return t;
}

}  // namespace pyllm
