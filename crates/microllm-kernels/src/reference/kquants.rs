//! K-quants (Q2_K .. Q6_K, 256-element super-blocks) and their Q8_K activations.
//!
//! Three kinds of code, each following a different part of llama.cpp on purpose:
//!
//! - **Quantizers** follow ggml's `quantize_row_q*_K_ref` (no importance matrix) and
//!   `quantize_row_q*_K_impl` (with one) operation for operation: ggml-base is compiled without
//!   FMA, so plain f32 arithmetic in the same order gives the same bytes as `llama-quantize`.
//!   Loops keep C's evaluation order (`w*x*l` is `(w*x)*l`) and C's integer truncations.
//! - **Dequantizers** follow `dequantize_row_q*_K` (two roundings for `d*q - m`).
//! - **Dot products** reproduce the float arithmetic of *ggml-cpu's x86 AVX2 kernels*, not of
//!   ggml's generic C: the integer part of a super-block is exact whatever the order, so what
//!   matters is which integer partial sums are converted to f32 and how they are multiplied and
//!   accumulated. Four shapes exist ([`KOrder`]); which one llama.cpp uses depends on the format
//!   and on the number of activation columns of the matmul (see [`k_order`]).

use super::{blocks, blocks_mut};
use crate::blocks::{
    cast_blocks, scale_min_k4, scales_q3_k, BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_K, BlockQ6_K,
    BlockQ8_K, F16Le, QK_K,
};
use crate::format::Fmt;
use crate::{GgmlType, KernelError};

/// ggml's `GROUP_MAX_EPS`: groups whose largest magnitude is below it quantize to zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even, through the `1.5 * 2^23` trick (so
/// that out-of-range inputs give the same garbage as in C).
#[inline]
fn nearest_int(f: f32) -> i32 {
    let val = f + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Round to f16 and read back, as `GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))`.
#[inline]
fn f16_round(v: f32) -> (F16Le, f32) {
    let h = F16Le::from_f32(v);
    (h, h.to_f32())
}

// ---------------------------------------------------------------------------------------
// ggml's scale searches (make_*_quants)
// ---------------------------------------------------------------------------------------

/// `make_qx_quants`: symmetric quantization of `x` to `-nmax..nmax-1`, stored biased by
/// `nmax` in `l`; returns the scale. `rmse_type` selects the error weighting when `qw` is
/// `None` (1: x², 2: 1, 3: |x|, else sqrt|x|); a negative value returns after the first guess.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8], rmse_type: i32, qw: Option<&[f32]>) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let clamp = |v: i32| v.min(nmax - 1).max(-nmax);
    let mut iscale = -nmaxf / max;
    if rmse_type == 0 {
        for i in 0..n {
            l[i] = (nmax + clamp(nearest_int(iscale * x[i]))) as i8;
        }
        return 1.0 / iscale;
    }
    let (rmse_type, return_early) = if rmse_type < 0 {
        (-rmse_type, true)
    } else {
        (rmse_type, false)
    };
    let weight = |i: usize| match qw {
        Some(q) => q[i],
        None => match rmse_type {
            1 => x[i] * x[i],
            2 => 1.0,
            3 => x[i].abs(),
            _ => x[i].abs().sqrt(),
        },
    };
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let li = clamp(nearest_int(iscale * x[i]));
        l[i] = (li + nmax) as i8;
        let w = weight(i);
        let lf = li as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    if return_early {
        return if suml2 > 0.0 {
            0.5 * (scale + 1.0 / iscale)
        } else {
            1.0 / iscale
        };
    }
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let lf = clamp(nearest_int(iscale * x[i])) as f32;
            let w = weight(i);
            sumlx += w * x[i] * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                l[i] = (nmax + clamp(nearest_int(iscale * x[i]))) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants`: as [`make_qx_quants`] with x² weights and an iterative refinement of
/// each element (Q3_K without an importance matrix).
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8], do_rmse: bool) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let clamp = |v: i32| v.min(nmax - 1).max(-nmax);
    let iscale = -(nmax as f32) / max;
    if do_rmse {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for i in 0..n {
            let li = clamp(nearest_int(iscale * x[i]));
            l[i] = li as i8;
            let w = x[i] * x[i];
            sumlx += w * x[i] * li as f32;
            suml2 += w * li as f32 * li as f32;
        }
        for _ in 0..5 {
            let mut n_changed = 0;
            for i in 0..n {
                let w = x[i] * x[i];
                let li = l[i] as f32;
                let mut slx = sumlx - w * x[i] * li;
                if slx > 0.0 {
                    let mut sl2 = suml2 - w * li * li;
                    let new_l = clamp(nearest_int(x[i] * sl2 / slx));
                    if new_l != l[i] as i32 {
                        let nl = new_l as f32;
                        slx += w * x[i] * nl;
                        sl2 += w * nl * nl;
                        if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                            l[i] = new_l as i8;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed += 1;
                        }
                    }
                }
            }
            if n_changed == 0 {
                break;
            }
        }
        for v in l[..n].iter_mut() {
            *v += nmax as i8;
        }
        return if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    }
    for i in 0..n {
        l[i] = (clamp(nearest_int(iscale * x[i])) + nmax) as i8;
    }
    1.0 / iscale
}

/// `make_qkx2_quants`: asymmetric quantization to `0..=nmax` with a minimum, searching
/// `nstep + 1` scales around `nmax / (max - min)` for the smallest weighted error. Returns
/// `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).min(nmax).max(0);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).min(nmax).max(0);
            laux[i] = li as u8;
            let (w, lf) = (weights[i], li as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qkx3_quants` with explicit weights (the importance-matrix quantizers): as
/// [`make_qkx2_quants`], except that a degenerate range is `max <= min`.
#[allow(clippy::too_many_arguments)]
fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).min(nmax).max(0);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_mad += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).min(nmax).max(0);
            laux[i] = li as u8;
            let (w, lf) = (weights[i], li as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += weights[i] * err(diff);
            }
            if mad < best_mad {
                l[..n].copy_from_slice(&laux[..n]);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qp_quants`: quantize non-negative `x` (sub-block scales or mins) to `0..=nmax` under
/// the weights `qw`, with a search and an iterative refinement. `l` gets C's `uint8_t`
/// truncation of the levels.
fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], qw: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / max;
    for i in 0..n {
        l[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let li = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * li as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let li = nearest_int(iscale * x[i]).min(nmax);
        l[i] = li as u8;
        let (w, lf) = (qw[i], li as f32);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Per-element importance of a super-block, `qw[i] * sqrt(sigma2 + x[i]²)` (the imatrix
/// quantizers' weighting).
#[inline]
fn imatrix_weights(qw: &[f32], x: &[f32], sigma2: f32, out: &mut [f32]) {
    for ((o, &q), &v) in out.iter_mut().zip(qw).zip(x) {
        *o = q * (sigma2 + v * v).sqrt();
    }
}

#[inline]
fn sum_sq(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s
}

/// Pack 256 2-bit levels: element `128h + 32k + l` at bits `2k` of byte `32h + l`.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8; QK_K / 4]) {
    for h in 0..2 {
        for i in 0..32 {
            let j = 128 * h;
            qs[32 * h + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// Pack 8 six-bit scales and mins into Q4_K/Q5_K's 12 bytes (inverse of [`scale_min_k4`]).
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xf) | ((lm[j] & 0xf) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Requantize Q4_K/Q5_K levels with the final (f16-rounded, 6-bit) scales and mins.
fn requantize_k4(x: &[f32], scales: &[u8; 12], d: F16Le, dmin: F16Le, nmax: i32, l: &mut [u8]) {
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, scales);
        let dd = d.to_f32() * sc as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            let li = nearest_int((x[32 * j + ii] + dm) / dd);
            l[32 * j + ii] = li.min(nmax).max(0) as u8;
        }
    }
}

/// A super-block's importance weights: `None`, or the matching `QK_K` slice of `qw`.
#[inline]
fn sb_weights(qw: Option<&[f32]>, i: usize) -> Option<&[f32]> {
    qw.map(|q| &q[QK_K * i..QK_K * (i + 1)])
}

// ---------------------------------------------------------------------------------------
// Quantizers
// ---------------------------------------------------------------------------------------

/// Q2_K, as `quantize_q2_K`: `quantize_row_q2_K_ref` without importance weights, otherwise
/// `quantize_row_q2_K_impl` with `qw` (one weight per element of the row `x`).
pub fn quantize_q2_k(x: &[f32], y: &mut [BlockQ2_K], qw: Option<&[f32]>) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q2_k: length mismatch");
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0f32; 16];
    let (mut mins, mut scales) = ([0f32; 16], [0f32; 16]);
    for (i, (xb, yb)) in x.chunks_exact(QK_K).zip(y.iter_mut()).enumerate() {
        let (d, dmin);
        match sb_weights(qw, i) {
            None => {
                let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
                for j in 0..16 {
                    let xs = &xb[16 * j..16 * j + 16];
                    for (w, v) in weights.iter_mut().zip(xs) {
                        *w = v.abs();
                    }
                    let (s, m) = make_qkx2_quants(
                        3,
                        xs,
                        &weights,
                        &mut l[16 * j..16 * j + 16],
                        &mut laux,
                        -0.5,
                        0.1,
                        15,
                        true,
                    );
                    scales[j] = s;
                    mins[j] = m;
                    if s > max_scale {
                        max_scale = s;
                    }
                    if m > max_min {
                        max_min = m;
                    }
                }
                if max_scale > 0.0 {
                    let iscale = 15.0 / max_scale;
                    for j in 0..16 {
                        yb.scales[j] = nearest_int(iscale * scales[j]) as u8;
                    }
                    d = F16Le::from_f32(max_scale / 15.0);
                } else {
                    yb.scales = [0; 16];
                    d = F16Le::from_f32(0.0);
                }
                if max_min > 0.0 {
                    let iscale = 15.0 / max_min;
                    for j in 0..16 {
                        let lm = nearest_int(iscale * mins[j]);
                        yb.scales[j] |= (lm << 4) as u8;
                    }
                    dmin = F16Le::from_f32(max_min / 15.0);
                } else {
                    dmin = F16Le::from_f32(0.0);
                }
            }
            Some(qw) => {
                let sigma2 = sum_sq(xb) / QK_K as f32;
                let mut sw = [0f32; 16];
                for j in 0..16 {
                    let xs = &xb[16 * j..16 * j + 16];
                    imatrix_weights(&qw[16 * j..16 * j + 16], xs, sigma2, &mut weights);
                    for &w in &weights {
                        sw[j] += w;
                    }
                    let (s, m) = make_qkx3_quants(
                        3,
                        xs,
                        &weights,
                        &mut l[16 * j..16 * j + 16],
                        &mut laux,
                        -0.9,
                        0.05,
                        36,
                        false,
                    );
                    scales[j] = s;
                    mins[j] = m;
                }
                let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
                let dm = make_qp_quants(15, &scales, &mut ls, &sw);
                let mm = make_qp_quants(15, &mins, &mut lm, &sw);
                d = F16Le::from_f32(dm);
                dmin = F16Le::from_f32(mm);
                for j in 0..16 {
                    yb.scales[j] = ls[j] | (lm[j] << 4);
                }
            }
        }
        yb.d = d;
        yb.dmin = dmin;
        for j in 0..16 {
            let dd = d.to_f32() * (yb.scales[j] & 0xf) as f32;
            if dd == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * (yb.scales[j] >> 4) as f32;
            for ii in 0..16 {
                let li = nearest_int((xb[16 * j + ii] + dm) / dd);
                l[16 * j + ii] = li.clamp(0, 3) as u8;
            }
        }
        pack_2bit(&l, &mut yb.qs);
    }
}

/// Q3_K, as `quantize_q3_K` (`_ref` without importance weights, `_impl` with them).
pub fn quantize_q3_k(x: &[f32], y: &mut [BlockQ3_K], qw: Option<&[f32]>) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q3_k: length mismatch");
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for (i, (xb, yb)) in x.chunks_exact(QK_K).zip(y.iter_mut()).enumerate() {
        yb.scales = [0; 12];
        match sb_weights(qw, i) {
            None => {
                let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
                for j in 0..16 {
                    scales[j] = make_q3_quants(
                        4,
                        &xb[16 * j..16 * j + 16],
                        &mut l[16 * j..16 * j + 16],
                        true,
                    );
                    if scales[j].abs() > amax {
                        amax = scales[j].abs();
                        max_scale = scales[j];
                    }
                }
                if max_scale != 0.0 {
                    let iscale = -32.0 / max_scale;
                    for j in 0..16 {
                        // C: int8_t l = nearest_int(...); clamp; + 32.
                        let lv = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
                        set_scale_q3_k(&mut yb.scales, j, lv as u8);
                    }
                    yb.d = F16Le::from_f32(1.0 / iscale);
                } else {
                    yb.d = F16Le::from_f32(0.0);
                }
            }
            Some(qw) => {
                let sigma2 = 2.0 * sum_sq(xb) / QK_K as f32;
                let mut weight = [0f32; 16];
                let mut sw = [0f32; 16];
                for j in 0..16 {
                    let xs = &xb[16 * j..16 * j + 16];
                    imatrix_weights(&qw[16 * j..16 * j + 16], xs, sigma2, &mut weight);
                    let mut sumw = 0.0f32;
                    for &w in &weight {
                        sumw += w;
                    }
                    sw[j] = sumw;
                    scales[j] =
                        make_qx_quants(4, xs, &mut l[16 * j..16 * j + 16], 1, Some(&weight));
                }
                let mut ls = [0i8; 16];
                let d_block = make_qx_quants(32, &scales, &mut ls, 1, Some(&sw));
                for j in 0..16 {
                    set_scale_q3_k(&mut yb.scales, j, ls[j] as u8);
                }
                yb.d = F16Le::from_f32(d_block);
            }
        }
        let sc = scales_q3_k(&yb.scales);
        for j in 0..16 {
            let dd = yb.d.to_f32() * (sc[j] as i8 - 32) as f32;
            if dd == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let li = nearest_int(xb[16 * j + ii] / dd).clamp(-4, 3);
                l[16 * j + ii] = (li + 4) as i8;
            }
        }
        yb.hmask = [0; 32];
        let mut lu = [0u8; QK_K];
        for j in 0..QK_K {
            let mut v = l[j] as u8;
            if l[j] > 3 {
                yb.hmask[j % 32] |= 1 << (j / 32);
                v -= 4;
            }
            lu[j] = v;
        }
        pack_2bit(&lu, &mut yb.qs);
    }
}

/// Store 6-bit scale `j` of a Q3_K block (the layout of [`scales_q3_k`]); `scales` starts zeroed.
fn set_scale_q3_k(scales: &mut [u8; 12], j: usize, lv: u8) {
    if j < 8 {
        scales[j] = lv & 0xf;
    } else {
        scales[j - 8] |= (lv & 0xf) << 4;
    }
    scales[j % 4 + 8] |= (lv >> 4) << (2 * (j / 4));
}

/// Q4_K, as `quantize_q4_K` (`_ref` without importance weights, `_impl` with them).
pub fn quantize_q4_k(x: &[f32], y: &mut [BlockQ4_K], qw: Option<&[f32]>) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q4_k: length mismatch");
    let mut l = [0u8; QK_K];
    for (i, (xb, yb)) in x.chunks_exact(QK_K).zip(y.iter_mut()).enumerate() {
        let (scales, d, dmin) = k4_scales(xb, 15, sb_weights(qw, i), &mut l, false);
        yb.scales = scales;
        yb.d = d;
        yb.dmin = dmin;
        requantize_k4(xb, &yb.scales, d, dmin, 15, &mut l);
        for j in 0..QK_K / 64 {
            for t in 0..32 {
                yb.qs[32 * j + t] = l[64 * j + t] | (l[64 * j + t + 32] << 4);
            }
        }
    }
}

/// Q5_K, as `quantize_q5_K` (`_ref` without importance weights, `_impl` with them).
pub fn quantize_q5_k(x: &[f32], y: &mut [BlockQ5_K], qw: Option<&[f32]>) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q5_k: length mismatch");
    let mut l = [0u8; QK_K];
    for (i, (xb, yb)) in x.chunks_exact(QK_K).zip(y.iter_mut()).enumerate() {
        let (scales, d, dmin) = k4_scales(xb, 31, sb_weights(qw, i), &mut l, true);
        yb.scales = scales;
        yb.d = d;
        yb.dmin = dmin;
        requantize_k4(xb, &yb.scales, d, dmin, 31, &mut l);
        yb.qh = [0; 32];
        for j in 0..QK_K / 64 {
            for t in 0..32 {
                let (mut l1, mut l2) = (l[64 * j + t], l[64 * j + t + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    yb.qh[t] |= 1 << (2 * j);
                }
                if l2 > 15 {
                    l2 -= 16;
                    yb.qh[t] |= 2 << (2 * j);
                }
                yb.qs[32 * j + t] = l1 | (l2 << 4);
            }
        }
    }
}

/// The sub-block scales/mins and super-block scales of Q4_K (`nmax` 15) and Q5_K (31), by
/// the `_ref` search without weights or the `_impl` one with them. `l` gets the first-pass
/// levels (requantized afterwards). `clamp_impl`: Q5_K's `_impl` clamps the 6-bit levels,
/// Q4_K's does not.
fn k4_scales(
    xb: &[f32],
    nmax: i32,
    qw: Option<&[f32]>,
    l: &mut [u8; QK_K],
    clamp_impl: bool,
) -> ([u8; 12], F16Le, F16Le) {
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let (mut mins, mut scales) = ([0f32; 8], [0f32; 8]);
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    match qw {
        None => {
            let (rmin, rdelta, nstep) = if nmax == 15 {
                (-1.0, 0.1, 20)
            } else {
                (-0.5, 0.1, 15)
            };
            let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
            for j in 0..8 {
                let xs = &xb[32 * j..32 * j + 32];
                let av_x = (sum_sq(xs) / 32.0).sqrt();
                for (w, v) in weights.iter_mut().zip(xs) {
                    *w = av_x + v.abs();
                }
                let (s, m) = make_qkx2_quants(
                    nmax,
                    xs,
                    &weights,
                    &mut l[32 * j..32 * j + 32],
                    &mut laux,
                    rmin,
                    rdelta,
                    nstep,
                    false,
                );
                scales[j] = s;
                mins[j] = m;
                if s > max_scale {
                    max_scale = s;
                }
                if m > max_min {
                    max_min = m;
                }
            }
            let inv_scale = if max_scale > 0.0 {
                63.0 / max_scale
            } else {
                0.0
            };
            let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
            for j in 0..8 {
                ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
                lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
            }
            (
                pack_scale_min_k4(&ls, &lm),
                F16Le::from_f32(max_scale / 63.0),
                F16Le::from_f32(max_min / 63.0),
            )
        }
        Some(qw) => {
            let sigma2 = 2.0 * sum_sq(xb) / QK_K as f32;
            let mut sw = [0f32; 8];
            for j in 0..8 {
                let xs = &xb[32 * j..32 * j + 32];
                imatrix_weights(&qw[32 * j..32 * j + 32], xs, sigma2, &mut weights);
                let mut sumw = 0.0f32;
                for &w in &weights {
                    sumw += w;
                }
                sw[j] = sumw;
                let (s, m) = make_qkx3_quants(
                    nmax,
                    xs,
                    &weights,
                    &mut l[32 * j..32 * j + 32],
                    &mut laux,
                    -0.9,
                    0.05,
                    36,
                    false,
                );
                scales[j] = s;
                mins[j] = m;
            }
            let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
            let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
            if clamp_impl {
                for j in 0..8 {
                    ls[j] = ls[j].min(63);
                    lm[j] = lm[j].min(63);
                }
            }
            (
                pack_scale_min_k4(&ls, &lm),
                F16Le::from_f32(d_block),
                F16Le::from_f32(m_block),
            )
        }
    }
}

/// Q6_K, as `quantize_q6_K` (`_ref` without importance weights, `_impl` with them).
pub fn quantize_q6_k(x: &[f32], y: &mut [BlockQ6_K], qw: Option<&[f32]>) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q6_k: length mismatch");
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for (i, (xb, yb)) in x.chunks_exact(QK_K).zip(y.iter_mut()).enumerate() {
        let qw = sb_weights(qw, i);
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for ib in 0..16 {
            let s = make_qx_quants(
                32,
                &xb[16 * ib..16 * ib + 16],
                &mut l[16 * ib..16 * ib + 16],
                1,
                qw.map(|q| &q[16 * ib..16 * ib + 16]),
            );
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            *yb = BlockQ6_K::default();
            yb.d = F16Le::from_f32(0.0);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let (d, df) = f16_round(1.0 / iscale);
        yb.d = d;
        for ib in 0..16 {
            yb.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..16 {
            let dd = df * yb.scales[j] as f32;
            if dd == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let li = nearest_int(xb[16 * j + ii] / dd).clamp(-32, 31);
                l[16 * j + ii] = (li + 32) as i8;
            }
        }
        for h in 0..2 {
            for t in 0..32 {
                let j = 128 * h;
                let q = |o: usize| l[j + t + o] as u8;
                yb.ql[64 * h + t] = (q(0) & 0xf) | ((q(64) & 0xf) << 4);
                yb.ql[64 * h + t + 32] = (q(32) & 0xf) | ((q(96) & 0xf) << 4);
                yb.qh[32 * h + t] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
    }
}

/// Q8_K activations, as ggml's `quantize_row_q8_K_ref` (which ggml-cpu's x86 `from_float`
/// calls): `iscale = -127 / max` with `max` the first element of largest magnitude (so `d`
/// is negative when that element is positive), round half to even, group sums of 16. An
/// all-zero block gets zero quants and zero sums.
pub fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8_K]) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q8_k: length mismatch");
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *yb = BlockQ8_K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for g in 0..16 {
            let s: i32 = yb.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
            yb.bsums[g] = (s as i16).to_le_bytes();
        }
        yb.d = (1.0 / iscale).to_le_bytes();
    }
}

// ---------------------------------------------------------------------------------------
// Dequantizers
// ---------------------------------------------------------------------------------------

/// Q2_K -> f32: `(d * sc) * q - dmin * m`.
pub fn dequantize_q2_k(x: &[BlockQ2_K], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK_K, "dequantize_q2_k: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (xb.d.to_f32(), xb.dmin.to_f32());
        for e in 0..QK_K {
            let sc = xb.scales[e / 16];
            let dl = d * (sc & 0xf) as f32;
            let ml = min * (sc >> 4) as f32;
            yb[e] = dl * q2(xb, e) as f32 - ml;
        }
    }
}

/// Q3_K -> f32: `(d * (sc - 32)) * (q - 4)`.
pub fn dequantize_q3_k(x: &[BlockQ3_K], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK_K, "dequantize_q3_k: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = xb.d.to_f32();
        let sc = scales_q3_k(&xb.scales);
        for e in 0..QK_K {
            let dl = d * (sc[e / 16] as i32 - 32) as f32;
            yb[e] = dl * q3(xb, e) as f32;
        }
    }
}

/// Q4_K -> f32: `(d * sc) * q - dmin * m`.
pub fn dequantize_q4_k(x: &[BlockQ4_K], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK_K, "dequantize_q4_k: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (xb.d.to_f32(), xb.dmin.to_f32());
        for e in 0..QK_K {
            let (sc, m) = scale_min_k4(e / 32, &xb.scales);
            yb[e] = (d * sc as f32) * q4k(xb, e) as f32 - min * m as f32;
        }
    }
}

/// Q5_K -> f32: `(d * sc) * q - dmin * m`.
pub fn dequantize_q5_k(x: &[BlockQ5_K], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK_K, "dequantize_q5_k: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (xb.d.to_f32(), xb.dmin.to_f32());
        for e in 0..QK_K {
            let (sc, m) = scale_min_k4(e / 32, &xb.scales);
            yb[e] = (d * sc as f32) * q5k(xb, e) as f32 - min * m as f32;
        }
    }
}

/// Q6_K -> f32: `(d * sc) * (q - 32)`.
pub fn dequantize_q6_k(x: &[BlockQ6_K], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK_K, "dequantize_q6_k: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = xb.d.to_f32();
        for e in 0..QK_K {
            yb[e] = d * xb.scales[e / 16] as f32 * (q6(xb, e) as i32 - 32) as f32;
        }
    }
}

/// Q8_K -> f32: `d * q`.
pub fn dequantize_q8_k(x: &[BlockQ8_K], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK_K, "dequantize_q8_k: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = xb.d();
        for (o, &q) in yb.iter_mut().zip(&xb.qs) {
            *o = d * q as f32;
        }
    }
}

// Element accessors (the layouts documented on the blocks).

/// Q2_K level of element `e` (0..=3).
#[inline]
fn q2(b: &BlockQ2_K, e: usize) -> u8 {
    let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
    (b.qs[32 * h + l] >> (2 * k)) & 3
}

/// Q3_K value of element `e` (-4..=3).
#[inline]
fn q3(b: &BlockQ3_K, e: usize) -> i8 {
    let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
    let low = (b.qs[32 * h + l] >> (2 * k)) & 3;
    let high = (b.hmask[l] >> (4 * h + k)) & 1;
    (low | (high << 2)) as i8 - 4
}

/// Q4_K level of element `e` (0..=15).
#[inline]
fn q4k(b: &BlockQ4_K, e: usize) -> u8 {
    let (j, hi, l) = (e / 64, (e % 64) / 32, e % 32);
    (b.qs[32 * j + l] >> (4 * hi)) & 0xf
}

/// Q5_K level of element `e` (0..=31).
#[inline]
fn q5k(b: &BlockQ5_K, e: usize) -> u8 {
    let (j, hi, l) = (e / 64, (e % 64) / 32, e % 32);
    let low = (b.qs[32 * j + l] >> (4 * hi)) & 0xf;
    low | (((b.qh[l] >> (e / 32)) & 1) << 4)
}

/// Q6_K level of element `e` (0..=63, unbiased value `q - 32`).
#[inline]
fn q6(b: &BlockQ6_K, e: usize) -> u8 {
    let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
    let low = (b.ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0xf;
    let high = (b.qh[32 * h + l] >> (2 * k)) & 3;
    low | (high << 4)
}

// ---------------------------------------------------------------------------------------
// Dot products: llama.cpp's x86 AVX2 accumulation orders
// ---------------------------------------------------------------------------------------

/// How the exact integer sums of a K-quant dot product are turned into an f32, one per
/// ggml-cpu x86 kernel. For a weight row `w` and an activation column `a`, per super-block
/// `b` with weight scales `dw`/`dmin` (f16) and activation scale `da` (f32):
///
/// - `VecDot` — `ggml_vec_dot_q{2,3,5,6}_K_q8_K` (matmuls with fewer than 8 columns): eight
///   i32 lanes per super-block, lane `l` holding the elements `32V + 4l .. 32V + 4l + 4` of
///   every 32-element chunk `V` times their group scale (Q6_K: minus
///   `32 * (sc[2l] * bsum[2l] + sc[2l+1] * bsum[2l+1])`), each lane accumulated as
///   `acc[l] = fma(da*dw, f32(lane), acc[l])` and the lanes summed at the end as
///   `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
///   Minimums: Q2_K first adds `fma(-da*dmin, f32(m[2l]*bsum[2l] + m[2l+1]*bsum[2l+1]))` per
///   lane, Q5_K keeps a scalar `s = fma(-da*dmin, f32(sum m*bsum), s)` added after the lanes.
/// - `Tiled` — ggml-cpu's tiled K-quant matmul (`tiled_run_microtile_avx2`, 8 or more
///   columns): `r = dw * f32(S)` with `S` the super-block's whole integer sum, minus
///   `dmin * f32(M)` fused (`M` = sum of min * group sum), then `acc = fma(r, da, acc)`.
/// - `RepackGemv` — the repacked Q4_K matvec (`ggml_gemv_q4_K_8x8_q8_K`, used for 1-3
///   columns and for the last `n % 4` columns): `acc = fma(f32(S), dw*da, acc)`,
///   `accm = fma(f32(M), dmin*da, accm)` per super-block, result `acc - accm`.
/// - `RepackGemm` — the repacked Q4_K matmul (`ggml_gemm_q4_K_8x8_q8_K`, columns in groups of
///   4): as `RepackGemv` but with one fma pair per 64 elements (two sub-blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KOrder {
    /// `ggml_vec_dot_q*_K_q8_K` (AVX2).
    VecDot,
    /// ggml-cpu's tiled K-quant matmul (AVX2 microkernel).
    Tiled,
    /// `ggml_gemv_q4_K_8x8_q8_K` (AVX2).
    RepackGemv,
    /// `ggml_gemm_q4_K_8x8_q8_K` (AVX2).
    RepackGemm,
}

/// Which [`KOrder`] llama.cpp's AVX2 build uses for column `col` of a matmul with `n_cols`
/// activation columns and K-quant weights `w` (`None` if `w` is not a K-quant). Q4_K weights
/// are assumed repacked, as ggml does for every Q4_K matrix whose row count is a multiple
/// of 8: columns `0 .. n_cols - n_cols % 4` go through the 4-column gemm, the rest through
/// the gemv. The other K-quants use the tiled path from 8 columns on, `vec_dot` below.
pub fn k_order(w: GgmlType, n_cols: usize, col: usize) -> Option<KOrder> {
    let f = Fmt::of(w)?;
    Some(k_order_fmt(f, n_cols, col)).filter(|_| f.is_k_weight())
}

pub(crate) fn k_order_fmt(f: Fmt, n_cols: usize, col: usize) -> KOrder {
    match f {
        Fmt::Q4_K if col < n_cols - n_cols % 4 => KOrder::RepackGemm,
        Fmt::Q4_K => KOrder::RepackGemv,
        _ if n_cols >= 8 => KOrder::Tiled,
        _ => KOrder::VecDot,
    }
}

/// A weight super-block as the integer kernels see it: the multiplied level `q` per element
/// (Q6_K unsigned 0..=63 with the `-32` folded in through the group sums, Q3_K signed -4..=3,
/// the others unsigned), a scale and a min per group of 16 (32-element sub-blocks repeat
/// theirs), and the f32 super-block scales.
struct KUnpacked {
    q: [i32; QK_K],
    sc: [i32; 16],
    m: [i32; 16],
    d: f32,
    dmin: f32,
}

fn unpack_k(f: Fmt, blk: &[u8]) -> KUnpacked {
    let mut u = KUnpacked {
        q: [0; QK_K],
        sc: [0; 16],
        m: [0; 16],
        d: 0.0,
        dmin: 0.0,
    };
    match f {
        Fmt::Q2_K => {
            let b: &BlockQ2_K = &cast_blocks(blk).expect("one block")[0];
            for e in 0..QK_K {
                u.q[e] = q2(b, e) as i32;
            }
            for g in 0..16 {
                u.sc[g] = (b.scales[g] & 0xf) as i32;
                u.m[g] = (b.scales[g] >> 4) as i32;
            }
            (u.d, u.dmin) = (b.d.to_f32(), b.dmin.to_f32());
        }
        Fmt::Q3_K => {
            let b: &BlockQ3_K = &cast_blocks(blk).expect("one block")[0];
            for e in 0..QK_K {
                u.q[e] = q3(b, e) as i32;
            }
            for (g, s) in scales_q3_k(&b.scales).iter().enumerate() {
                u.sc[g] = *s as i32 - 32;
            }
            u.d = b.d.to_f32();
        }
        Fmt::Q4_K | Fmt::Q5_K => {
            let (d, dmin, scales) = if f == Fmt::Q4_K {
                let b: &BlockQ4_K = &cast_blocks(blk).expect("one block")[0];
                for e in 0..QK_K {
                    u.q[e] = q4k(b, e) as i32;
                }
                (b.d, b.dmin, b.scales)
            } else {
                let b: &BlockQ5_K = &cast_blocks(blk).expect("one block")[0];
                for e in 0..QK_K {
                    u.q[e] = q5k(b, e) as i32;
                }
                (b.d, b.dmin, b.scales)
            };
            for g in 0..16 {
                let (s, m) = scale_min_k4(g / 2, &scales);
                u.sc[g] = s as i32;
                u.m[g] = m as i32;
            }
            (u.d, u.dmin) = (d.to_f32(), dmin.to_f32());
        }
        Fmt::Q6_K => {
            let b: &BlockQ6_K = &cast_blocks(blk).expect("one block")[0];
            for e in 0..QK_K {
                u.q[e] = q6(b, e) as i32;
            }
            for g in 0..16 {
                u.sc[g] = b.scales[g] as i32;
            }
            u.d = b.d.to_f32();
        }
        _ => unreachable!("not a K-quant weight format"),
    }
    u
}

/// The eight `VecDot` lanes (see [`KOrder::VecDot`]), Q6_K's bias correction included.
fn vecdot_lanes(f: Fmt, u: &KUnpacked, a: &BlockQ8_K) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for (l, lane) in lanes.iter_mut().enumerate() {
        for v in 0..8 {
            let e0 = 32 * v + 4 * l;
            let dot: i32 = (e0..e0 + 4).map(|e| u.q[e] * a.qs[e] as i32).sum();
            *lane += u.sc[e0 / 16] * dot;
        }
        if f == Fmt::Q6_K {
            *lane -= 32
                * (u.sc[2 * l] * a.bsum(2 * l) as i32 + u.sc[2 * l + 1] * a.bsum(2 * l + 1) as i32);
        }
    }
    lanes
}

/// Sum of min * group sum over groups `g0..g1` of 16.
fn min_sum(u: &KUnpacked, a: &BlockQ8_K, g0: usize, g1: usize) -> i32 {
    (g0..g1).map(|g| u.m[g] * a.bsum(g) as i32).sum()
}

/// `hsum_float_8`: `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[inline]
fn hsum8(a: [f32; 8]) -> f32 {
    let r = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Dot product of one K-quant weight row `w` with one Q8_K activation row `a` (whole blocks,
/// the same count), accumulated in `order` (see [`KOrder`]).
///
/// # Panics
/// If `f` is not a K-quant weight format or the lengths do not match.
pub(crate) fn dot_k(f: Fmt, order: KOrder, w: &[u8], a: &[u8]) -> f32 {
    let wb = f.block_bytes();
    let ab: &[BlockQ8_K] = cast_blocks(a).expect("whole Q8_K blocks");
    assert_eq!(w.len(), ab.len() * wb, "dot_k: block counts differ");
    let has_min = matches!(f, Fmt::Q2_K | Fmt::Q4_K | Fmt::Q5_K);
    let mut acc8 = [0.0f32; 8];
    let (mut acc, mut accm, mut summs) = (0.0f32, 0.0f32, 0.0f32);
    for (blk, a) in w.chunks_exact(wb).zip(ab) {
        let u = unpack_k(f, blk);
        let da = a.d();
        match order {
            KOrder::VecDot => {
                let lanes = vecdot_lanes(f, &u, a);
                let d = da * u.d;
                let dmin = -da * u.dmin;
                if f == Fmt::Q2_K {
                    for l in 0..8 {
                        let p = u.m[2 * l] * a.bsum(2 * l) as i32
                            + u.m[2 * l + 1] * a.bsum(2 * l + 1) as i32;
                        acc8[l] = dmin.mul_add(p as f32, acc8[l]);
                    }
                }
                if f == Fmt::Q5_K {
                    summs = dmin.mul_add(min_sum(&u, a, 0, 16) as f32, summs);
                }
                for l in 0..8 {
                    acc8[l] = d.mul_add(lanes[l] as f32, acc8[l]);
                }
            }
            KOrder::Tiled => {
                let s: i32 = vecdot_lanes(f, &u, a).iter().sum();
                let mut r = u.d * s as f32;
                if has_min {
                    r = (-u.dmin).mul_add(min_sum(&u, a, 0, 16) as f32, r);
                }
                acc = r.mul_add(da, acc);
            }
            KOrder::RepackGemv => {
                let s: i32 = vecdot_lanes(f, &u, a).iter().sum();
                acc = (s as f32).mul_add(u.d * da, acc);
                accm = (min_sum(&u, a, 0, 16) as f32).mul_add(u.dmin * da, accm);
            }
            KOrder::RepackGemm => {
                for sb in 0..4 {
                    let s: i32 = (64 * sb..64 * sb + 64)
                        .map(|e| u.sc[e / 16] * u.q[e] * a.qs[e] as i32)
                        .sum();
                    acc = (s as f32).mul_add(u.d * da, acc);
                    let m = min_sum(&u, a, 4 * sb, 4 * sb + 4);
                    accm = (m as f32).mul_add(u.dmin * da, accm);
                }
            }
        }
    }
    match order {
        KOrder::VecDot => hsum8(acc8) + summs,
        KOrder::Tiled => acc,
        KOrder::RepackGemv | KOrder::RepackGemm => acc - accm,
    }
}

// ---------------------------------------------------------------------------------------
// Byte-level entry points (called from `reference`)
// ---------------------------------------------------------------------------------------

/// Quantize a row of a K format (Q8_K: activations); `qw` as in [`quantize_q2_k`].
pub(crate) fn quantize_row_k(f: Fmt, x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    match f {
        Fmt::Q2_K => quantize_q2_k(x, blocks_mut(out), qw),
        Fmt::Q3_K => quantize_q3_k(x, blocks_mut(out), qw),
        Fmt::Q4_K => quantize_q4_k(x, blocks_mut(out), qw),
        Fmt::Q5_K => quantize_q5_k(x, blocks_mut(out), qw),
        Fmt::Q6_K => quantize_q6_k(x, blocks_mut(out), qw),
        Fmt::Q8_K => quantize_q8_k(x, blocks_mut(out)),
        _ => unreachable!("not a K format"),
    }
}

/// Dequantize a row of a K format.
pub(crate) fn dequantize_row_k(f: Fmt, x: &[u8], out: &mut [f32]) {
    match f {
        Fmt::Q2_K => dequantize_q2_k(blocks(x), out),
        Fmt::Q3_K => dequantize_q3_k(blocks(x), out),
        Fmt::Q4_K => dequantize_q4_k(blocks(x), out),
        Fmt::Q5_K => dequantize_q5_k(blocks(x), out),
        Fmt::Q6_K => dequantize_q6_k(blocks(x), out),
        Fmt::Q8_K => dequantize_q8_k(blocks(x), out),
        _ => unreachable!("not a K format"),
    }
}

/// Check an importance-weight slice against a row of `n` elements.
pub(crate) fn check_weights(qw: Option<&[f32]>, n: usize) -> Result<(), KernelError> {
    match qw {
        Some(q) if q.len() != n => Err(KernelError::BadLength {
            what: "importance weights (one per element of the row)",
            expected: n,
            got: q.len(),
        }),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Importance-weighted legacy quantizers (they share the searches above)
// ---------------------------------------------------------------------------------------

/// `quantize_row_q{4,5}_{0,1}_impl` with importance weights `qw` (one per element of the row
/// `x`, which must be a whole matrix row: the weighting uses the row's mean square).
pub(crate) fn quantize_legacy_weighted(f: Fmt, x: &[f32], out: &mut [u8], qw: &[f32]) {
    use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, QK};
    let sigma2 = sum_sq(x) / x.len() as f32;
    let mut weight = [0f32; QK];
    let pack5 = |l: &[u8; QK], qs: &mut [u8; 16], qh: &mut [u8; 4]| {
        let mut h = 0u32;
        for j in 0..16 {
            qs[j] = (l[j] & 0x0f) | ((l[j + 16] & 0x0f) << 4);
            h |= (((l[j] & 0x10) >> 4) as u32) << j;
            h |= (((l[j + 16] & 0x10) >> 4) as u32) << (j + 16);
        }
        *qh = h.to_le_bytes();
    };
    for (ib, (xb, qb)) in x.chunks_exact(QK).zip(qw.chunks_exact(QK)).enumerate() {
        imatrix_weights(qb, xb, sigma2, &mut weight);
        match f {
            Fmt::Q4_0 | Fmt::Q5_0 => {
                let mut l = [0i8; QK];
                let nmax = if f == Fmt::Q4_0 { 8 } else { 16 };
                let d = F16Le::from_f32(make_qx_quants(nmax, xb, &mut l, 1, Some(&weight)));
                let lu = l.map(|v| v as u8);
                if f == Fmt::Q4_0 {
                    let y: &mut [BlockQ4_0] = blocks_mut(out);
                    y[ib].d = d;
                    for j in 0..16 {
                        y[ib].qs[j] = lu[j] | (lu[j + 16] << 4);
                    }
                } else {
                    let y: &mut [BlockQ5_0] = blocks_mut(out);
                    y[ib].d = d;
                    pack5(&lu, &mut y[ib].qs, &mut y[ib].qh);
                }
            }
            Fmt::Q4_1 | Fmt::Q5_1 => {
                let (mut l, mut laux) = ([0u8; QK], [0u8; QK]);
                let nmax = if f == Fmt::Q4_1 { 15 } else { 31 };
                let (d, the_min) =
                    make_qkx3_quants(nmax, xb, &weight, &mut l, &mut laux, -0.9, 0.05, 36, false);
                let (d, m) = (F16Le::from_f32(d), F16Le::from_f32(-the_min));
                if f == Fmt::Q4_1 {
                    let y: &mut [BlockQ4_1] = blocks_mut(out);
                    (y[ib].d, y[ib].m) = (d, m);
                    for j in 0..16 {
                        y[ib].qs[j] = l[j] | (l[j + 16] << 4);
                    }
                } else {
                    let y: &mut [BlockQ5_1] = blocks_mut(out);
                    (y[ib].d, y[ib].m) = (d, m);
                    pack5(&l, &mut y[ib].qs, &mut y[ib].qh);
                }
            }
            _ => unreachable!("not a legacy weight format with an importance quantizer"),
        }
    }
}
