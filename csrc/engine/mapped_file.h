// A read-only memory map of a model file, and the checked table of the
// tensors inside it. Nothing reads tensor memory before TensorTable::add has
// checked the tensor's byte range against the file.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pyllm {

class MappedFile {
public:
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    const uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }
    const std::string& path() const { return path_; }
    // Tells the kernel this process will not read [p, p + n) again (the whole
    // pages inside it leave the resident set; a later read maps them back in).
    void release(const void* p, uint64_t n) const;

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
};

enum class DType { F32, F16, BF16, I8, U8, I32 };
int64_t dtype_size(DType t);
DType dtype_from_name(const std::string& name);  // safetensors names: F32, F16, BF16, I8, U8, I32

struct TensorRef {
    DType dtype;
    std::vector<int64_t> shape;
    const uint8_t* data;
    int64_t numel;
};

class TensorTable {
public:
    explicit TensorTable(const MappedFile& file, uint64_t data_offset);
    // Registers a tensor whose bytes are [data_offset + begin, data_offset + end)
    // of the file; throws std::invalid_argument when that range leaves the
    // file, disagrees with dtype x shape, overflows, or is misaligned.
    void add(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape, uint64_t begin,
             uint64_t end);
    bool has(const std::string& name) const { return tensors_.count(name) != 0; }
    // Throws std::invalid_argument if absent or not of this dtype and shape.
    const TensorRef& get(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const;

private:
    const MappedFile& file_;
    uint64_t data_offset_;
    std::map<std::string, TensorRef> tensors_;
};

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace pyllm
