// A standalone run of scan.cu's kernels through the CUDA emulation (cuda_kernels/cuda_emu.h),
// for ThreadSanitizer: a pruned float problem of three chunks with every option on (gaps
// before the first and after the last token, a gap across each chunk boundary, groups, D,
// z, delta_bias, softplus, "hold"), forward with chunk states, then backward, as
// cuda_kernels/scan_cu.py launches them. Built by tests/kernels/test_cuda_emu.py with
// cuda_emu.build(..., sanitize="thread", driver=this file), after the emulation header and
// the scan.cu under test. Prints a checksum; TSan prints any race it sees.
#include <cstdio>
#include <vector>

namespace {

unsigned long long lcg_state = 12345;
float uniform(float lo, float hi) {
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return lo + (hi - lo) * float((lcg_state >> 33) & 0xFFFFFF) / float(0x1000000);
}

}  // namespace

int main() {
    const int batch = 1, dim = 2, dstate = 3, groups = 1;
    const int length = 3 * SCAN_CHUNK - 5;                 // three chunks, the last one partial
    const int nchunks = (length + SCAN_CHUNK - 1) / SCAN_CHUNK;
    std::vector<float> u(batch * dim * length), delta(u.size()), z(u.size()), dout(u.size());
    std::vector<float> A(dim * dstate), D(dim), bias(dim);
    std::vector<float> B(batch * groups * dstate * length), C(B.size());
    for (auto* v : {&u, &z, &dout, &B, &C}) for (auto& x : *v) x = uniform(-1.f, 1.f);
    for (auto& x : delta) x = uniform(-1.f, 1.f);
    for (auto& x : A) x = -uniform(0.3f, 2.f);
    for (auto& x : D) x = uniform(-1.f, 1.f);
    for (auto& x : bias) x = uniform(-0.5f, 0.5f);
    // The map's coefficients under "hold" (PositionMap.coefficients): gap g_i, E_i = Δ_i +
    // (g_i - 1)·Δ_{i-1}, hold q_i = g_i - 1; a gap of 3 at every chunk boundary.
    std::vector<float> coef_self(batch * length, 1.f), coef_prev(batch * length), hold(batch * length);
    for (int i = 1; i < length; ++i) {
        const float gap = (i % SCAN_CHUNK == 0) ? 3.f : float(1 + (i % 3 == 0));
        coef_prev[i] = gap - 1.f;
        hold[i] = gap - 1.f;
    }
    std::vector<float> trailing(batch, 4.f);
    std::vector<float> out(u.size()), last(batch * dim * dstate), states(batch * dim * nchunks * dstate);
    const dim3 grid(dim, batch), block(SCAN_THREADS);
    cuda_emu::launch(grid, block, [&] {
        selective_scan_fwd<float>(u.data(), delta.data(), A.data(), B.data(), C.data(), D.data(), z.data(),
                                  bias.data(), coef_self.data(), coef_prev.data(), hold.data(), trailing.data(),
                                  dim, dstate, groups, length, 1, 1, 1, 1, 1, 1, 1, 1, out.data(), last.data(),
                                  states.data());
    });
    std::vector<float> du(u.size()), ddelta(u.size()), dz(u.size());
    std::vector<float> dB(batch * dim * dstate * length), dC(batch * dim * dstate * length);   // per-channel partials
    std::vector<float> dA_part(dim * dstate), dD_part(dim), dbias_part(dim);
    cuda_emu::launch(grid, block, [&] {
        selective_scan_bwd<float>(u.data(), delta.data(), A.data(), B.data(), C.data(), D.data(),
                                  z.data(), bias.data(), coef_self.data(), coef_prev.data(), hold.data(),
                                  trailing.data(), dim, dstate, groups, length, 1, 1, 1, 1, 1, 1, dout.data(),
                                  states.data(), du.data(),
                                  ddelta.data(), dz.data(), dB.data(), dC.data(), dA_part.data(), dD_part.data(),
                                  dbias_part.data());
    });
    double checksum = 0;
    for (auto* v : {&out, &last, &du, &ddelta, &dz, &dB, &dC, &dA_part, &dD_part, &dbias_part})
        for (float x : *v) checksum += x;
    std::printf("checksum %.6e\n", checksum);
    return 0;
}
