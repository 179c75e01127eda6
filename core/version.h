#pragma once
namespace decotron {
inline constexpr const char* kVersion = "0.1.0";
}
