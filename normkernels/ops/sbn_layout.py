"""The column layouts of the tensors the SBN family's ops exchange, in one place for Python (the
torch oracle, the Triton host code and kernels, the fakes). csrc/sbn_finalize.h has the same as
enums (RowCol, SavedCol, GradCol; csrc/sbn.cpp documents each column); tests/test_sbn_layout.py
checks that the two agree.

  ROWS   sbn_stats' (C, 8) row per process: the sample count, the shift and the sums of t = x - shift
  SAVED  sbn_forward's (C, 26): the apply coefficients (first 5), the BN stage's, the SBN stage's,
         the group's sums and this process's sums (BN+SBN and SBN alike: SBN has the BN stage off)
  GSUMS  sbn_grad_stats' (C, 4) gradient sums
"""
FFT_NORMS = ("backward", "ortho", "forward")  # torch.fft's norm=, in csrc/sbn_finalize.h's FftNorm order
SUMS = ("sum_t", "sum_t2", "sum_row2", "sum_alt2", "sum_d_re", "sum_d_im")
ROWS = ("count", "shift") + SUMS
APPLY = ("shift", "x_scale", "offset", "pr_coef", "pi_coef")  # pre = x_scale (x - shift) + offset + row-0 terms
SAVED = APPLY + ("bn_scale", "bn_std", "z_shift", "mean_re", "mean_im", "sbn_std", "sbn_scale", "bn_mean",
                 "count") + SUMS + tuple("local_" + s for s in SUMS)
GSUMS = ("sum_g", "sum_gt", "sum_g_pr", "sum_g_pi")

ROW = {name: i for i, name in enumerate(ROWS)}
COL = {name: i for i, name in enumerate(SAVED)}
GSUM = {name: i for i, name in enumerate(GSUMS)}
