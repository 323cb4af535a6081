"""The column layouts of the tensors the SBN and BN+SBN ops exchange, in one place for Python
(the torch oracle, the Triton host code and kernels, the fakes). csrc/sbn_finalize.h has the same
as enums (RowCol, SavedCol, BnSavedCol, GradCol; csrc/sbn.cpp documents each column);
tests/test_sbn_layout.py checks that the two agree.

  ROWS         sbn_stats' (C, 8) row per process: count and shifted sums
  SBN_SAVED    sbn_forward's (C, 10) saved coefficients
  BNSBN_SAVED  bnsbn_forward's (C, 26): SBN's columns, BN's (p, sd, Kz, mbn), the group's sums
               and this process's sums
  GSUMS        sbn_grad_stats' (C, 4) gradient sums
"""
FFT_NORMS = ("backward", "ortho", "forward")  # torch.fft's norm=, in csrc/sbn_finalize.h's FftNorm order
ROWS = ("N", "K", "S1", "S2", "SR", "SA", "SD0", "SD1")
SBN_SAVED = ("K", "cx", "b", "u", "v", "mr", "mi", "s", "a", "N_all")
BNSBN_SAVED = ("K", "cx", "b", "u", "v", "p", "sd", "Kz", "mr", "mi", "s", "a", "mbn", "N_all",
               "S1", "S2", "SR", "SA", "SD0", "SD1", "L1", "L2", "LR", "LA", "LD0", "LD1")
GSUMS = ("Sdy", "Gt", "G0", "G1")
