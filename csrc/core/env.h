// Environment switches (PYLLM_PROFILE, PYLLM_HUGE_PAGES, PYLLM_CUDA_GRAPH), read one way.
#pragma once

#include <cctype>
#include <cstdlib>
#include <string>

namespace pyllm {

// An on/off environment variable: unset or empty gives `fallback`; "0", "false", "off" and "no" (any
// case, spaces around ignored) are off; anything else is on. ("false" and "off" were on for every
// switch but the one that compared with "0" alone, and "0" was the only off value.)
inline bool env_switch(const char* name, bool fallback) {
    const char* raw = std::getenv(name);
    if (raw == nullptr) return fallback;
    std::string value(raw);
    while (!value.empty() && std::isspace((unsigned char)value.back())) value.pop_back();
    size_t start = 0;
    while (start < value.size() && std::isspace((unsigned char)value[start])) ++start;
    value = value.substr(start);
    if (value.empty()) return fallback;
    for (char& c : value) c = (char)std::tolower((unsigned char)c);
    return !(value == "0" || value == "false" || value == "off" || value == "no");
}

}  // namespace pyllm
