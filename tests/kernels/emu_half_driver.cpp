// The 16-bit conversions of the CUDA emulation (cuda_kernels/cuda_emu.h) over a file of
// values, for tests/kernels/test_cuda_emu.py, which compares them bit for bit with NumPy's
// float16 and torch's bfloat16 casts. Built with cuda_emu.build(..., driver=this file).
//   emu_half_driver FLOATS NARROWED WIDENED
// FLOATS: float32 values; NARROWED: per value, __float2half_rn's then __float2bfloat16_rn's
// bits (uint16 pairs); WIDENED: for each of the 65536 bit patterns, __half2float's then
// __bfloat162float's result (float32 pairs).
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 4) return 2;
    std::FILE* in = std::fopen(argv[1], "rb");
    if (in == nullptr) return 3;
    std::vector<float> values;
    float value;
    while (std::fread(&value, sizeof value, 1, in) == 1) values.push_back(value);
    std::fclose(in);
    std::vector<unsigned short> narrowed;
    for (float f : values) {
        narrowed.push_back(__float2half_rn(f).x);
        narrowed.push_back(__float2bfloat16_rn(f).x);
    }
    std::vector<float> widened;
    for (unsigned bits = 0; bits < 65536u; ++bits) {
        widened.push_back(__half2float(__half{static_cast<unsigned short>(bits)}));
        widened.push_back(__bfloat162float(__nv_bfloat16{static_cast<unsigned short>(bits)}));
    }
    std::FILE* out = std::fopen(argv[2], "wb");
    if (out == nullptr || std::fwrite(narrowed.data(), sizeof(unsigned short), narrowed.size(), out) != narrowed.size())
        return 4;
    std::fclose(out);
    out = std::fopen(argv[3], "wb");
    if (out == nullptr || std::fwrite(widened.data(), sizeof(float), widened.size(), out) != widened.size()) return 5;
    std::fclose(out);
    return 0;
}
