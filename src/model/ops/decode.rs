//! Forward-only kernels for decoding: one-token attention over the KV cache, few-row matmul.

use super::*;

// ---------------------------------------------------------------- attention of one new token

/// Attention output (B, H, 1, D) of one new query per row, q (B, H, 1, D), over cached keys and
/// values (B, K, S, D) (strided views of the cache are read in place), with `mask` (B, S)
/// additive and `scale` applied to the scores. No gradient: decoding only. Replaces B·K tiny
/// GEMM calls per layer and step with one pass.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    if !fused(q) {
        return generic::decode_attention(q, k, v, scale, mask);
    }
    f32_contiguous(q)?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention { scale: scale as f32, mask: mask_values(mask)?, level: simd::level() },
    )
}

struct DecodeAttention {
    scale: f32,
    mask: Option<Arc<Vec<f32>>>,
    level: simd::Level,
}

/// The f32 data of a 4-D tensor whose last dimension is contiguous, with its strides.
fn strided4<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(&'a [f32], [usize; 4])> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        bail!("{op}: keys and values must be 4-D with a contiguous last dimension");
    }
    Ok((&s.as_slice::<f32>()?[l.start_offset()..], [st[0], st[1], st[2], st[3]]))
}

/// One head of one row: `o = softmax(scale·q·kᵀ + mask) · v` over the S keys `key(j)` and
/// values `value(j)`. Written once and compiled for each [`simd::Level`]: the same IEEE
/// operations in the same order, so every path gives the same bits.
#[inline(always)]
fn attend<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    s: usize,
    bias: impl Fn(usize) -> f32,
    scale: f32,
    o: &mut [f32],
) {
    // Plain loops: an iterator's `fold` is not inlined here, and code outside this function is
    // compiled without the caller's target features (the scores ran as SSE).
    let mut p = vec![0f32; s];
    for (j, pj) in p.iter_mut().enumerate() {
        *pj = dot(q, key(j)) * scale + bias(j);
    }
    softmax_in_place(&mut p);
    for (j, pj) in p.iter().enumerate() {
        for (a, &x) in o.iter_mut().zip(value(j)) {
            *a += pj * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    s: usize,
    bias: impl Fn(usize) -> f32,
    scale: f32,
    o: &mut [f32],
) {
    attend(q, key, value, s, bias, scale, o)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes so the compiler vectorizes the reduction.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "kdllm-decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32s(s1, l1, self.name())?;
        let &[b, h, 1, d] = l1.dims() else { bail!("decode attention: query must be (B, H, 1, D)") };
        let (k, ks) = strided4(s2, l2, self.name())?;
        let (v, vs) = strided4(s3, l3, self.name())?;
        let &[kb, kh, s, kd] = l2.dims() else { bail!("decode attention: keys must be 4-D") };
        if kb != b || kd != d || h % kh != 0 || l3.dims() != l2.dims() {
            bail!("decode attention: q {:?}, k {:?}, v {:?} do not fit", l1.dims(), l2.dims(), l3.dims());
        }
        if self.mask.as_ref().is_some_and(|m| m.len() != b * s) {
            bail!("decode attention: mask does not have B·S = {} entries", b * s);
        }
        let group = h / kh;
        let mut out = vec![0f32; q.len()];
        let head = |i: usize, o: &mut [f32]| {
            let (bi, g) = (i / h, (i % h) / group);
            let qr = &q[i * d..(i + 1) * d];
            let key = |j: usize| &k[bi * ks[0] + g * ks[1] + j * ks[2]..][..d];
            let value = |j: usize| &v[bi * vs[0] + g * vs[1] + j * vs[2]..][..d];
            let bias = |j: usize| self.mask.as_ref().map_or(0.0, |m| m[bi * s + j]);
            #[cfg(target_arch = "x86_64")]
            if self.level >= simd::Level::Avx2 {
                // SAFETY: the level never exceeds what the CPU supports (simd::detected).
                return unsafe { attend_avx2(qr, key, value, s, bias, self.scale, o) };
            }
            attend(qr, key, value, s, bias, self.scale, o)
        };
        if b * h * s * d < PAR_MIN {
            out.chunks_mut(d).enumerate().for_each(|(i, o)| head(i, o));
        } else {
            team::for_each_chunk(&mut out, d, head);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- few-row matmul (decoding)

/// Row counts up to which [`matmul_few_rows`] beats the GEMM (decode steps of small batches).
pub const FEW_ROWS: usize = 8;

/// `x · wᵀ` for x (M, K) with M ≤ [`FEW_ROWS`] and w (N, K) as stored, f32 or bf16, without
/// gradient; the result has x's dtype. The GEMM packs the whole weight matrix at every call,
/// which dominates a decode step; this kernel streams each weight row once and reuses it for
/// every row of x, widening bf16 weights to f32 as it loads them (half the bytes to stream).
/// AVX-512 and AVX2+FMA paths ([`simd::level`]). `None` where it does not apply (not the CPU,
/// neither extension, more rows, other dtypes): the caller uses the GEMM.
pub fn matmul_few_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let level = simd::level();
    if !fused(x) || level == simd::Level::Scalar {
        return Ok(None);
    }
    let fits = x.rank() == 2 && x.dim(0)? <= FEW_ROWS && w.rank() == 2 && x.dim(1)? == w.dim(1)?;
    let dtypes = matches!(x.dtype(), DType::F32 | DType::BF16) && matches!(w.dtype(), DType::F32 | DType::BF16);
    if !(fits && dtypes) {
        return Ok(None);
    }
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &FewRows { level })?;
    Ok(Some(y.to_dtype(x.dtype())?))
}

struct FewRows {
    level: simd::Level,
}

impl CustomOp2 for FewRows {
    fn name(&self) -> &'static str {
        "kdllm-matmul-few-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let (&[m, k], &[n, _]) = (l1.dims(), l2.dims()) else { bail!("matmul_few_rows: needs 2-D operands") };
        let Some((start, _)) = l2.contiguous_offsets() else { bail!("matmul_few_rows: weights must be contiguous") };
        // The weights as an address and an element type; bf16 is read as its raw u16 bits.
        let (w_addr, bf16) = match s2 {
            CpuStorage::F32(v) => (v[start..start + n * k].as_ptr() as usize, false),
            CpuStorage::BF16(v) => (v[start..start + n * k].as_ptr() as usize, true),
            _ => bail!("matmul_few_rows: weights must be f32 or bf16"),
        };
        // Computed as yᵀ (N, M) so that each task owns whole rows, then transposed.
        let mut yt = vec![0f32; n * m];
        let per_task = 64;
        let level = self.level;
        let task = |ti: usize, chunk: &mut [f32]| {
            let o0 = ti * per_task;
            // SAFETY: matmul_few_rows checked the level against the CPU; rows o0.. of the
            // weights lie inside the slice taken above (chunk holds at most n − o0 rows).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (wf, wb) = ((w_addr as *const f32).add(o0 * k), (w_addr as *const u16).add(o0 * k));
                match (level, bf16) {
                    (simd::Level::Avx512, true) => few_rows_avx512::block(x, m, k, few_rows_avx512::Bf16(wb), chunk),
                    (simd::Level::Avx512, false) => few_rows_avx512::block(x, m, k, few_rows_avx512::F32(wf), chunk),
                    (_, true) => few_rows_avx2::block(x, m, k, few_rows_avx2::Bf16(wb), chunk),
                    (_, false) => few_rows_avx2::block(x, m, k, few_rows_avx2::F32(wf), chunk),
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (o0, chunk, w_addr, bf16, level);
        };
        if n * k < 1 << 18 {
            yt.chunks_mut(per_task * m).enumerate().for_each(|(ti, chunk)| task(ti, chunk));
        } else {
            team::for_each_chunk(&mut yt, per_task * m, task);
        }
        let mut y = vec![0f32; m * n];
        for (o, col) in yt.chunks(m).enumerate() {
            for (mi, &v) in col.iter().enumerate() {
                y[mi * n + o] = v;
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// The few-row kernel for one vector width: `$lanes` f32 lanes in `$v`, tiles of up to 4 weight
/// rows by `$mb` rows of x held in registers (AVX2 has 16 of them, AVX-512 32).
macro_rules! few_rows_kernel {
    ($module:ident, $feature:literal, $v:ty, $lanes:literal, $mb:literal,
     zero: $zero:ident, load: $load:ident, fma: $fma:ident, sum: $sum:expr, bf16: $bf16:expr) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use std::arch::x86_64::*;

            /// Weight rows (K elements each) that load `$lanes` at a time as f32.
            pub trait Rows: Copy {
                unsafe fn load(self, i: usize) -> $v;
                unsafe fn get(self, i: usize) -> f32;
            }

            #[derive(Clone, Copy)]
            pub struct F32(pub *const f32);

            #[derive(Clone, Copy)]
            pub struct Bf16(pub *const u16);

            impl Rows for F32 {
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn load(self, i: usize) -> $v {
                    $load(self.0.add(i))
                }
                unsafe fn get(self, i: usize) -> f32 {
                    *self.0.add(i)
                }
            }

            impl Rows for Bf16 {
                // bf16 is the top half of an f32: widen to 32 bits and shift into place.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn load(self, i: usize) -> $v {
                    $bf16(self.0.add(i))
                }
                unsafe fn get(self, i: usize) -> f32 {
                    f32::from_bits((*self.0.add(i) as u32) << 16)
                }
            }

            /// yt[o·M + i] = w[o] · x[i] for the yt.len() / M weight rows of `w` and the rows i of x (M, K).
            #[target_feature(enable = $feature)]
            pub unsafe fn block<W: Rows>(x: &[f32], m: usize, k: usize, w: W, yt: &mut [f32]) {
                let n = yt.len() / m;
                let mut o = 0;
                while o < n {
                    let nb = (n - o).min(4);
                    let mut i = 0;
                    while i < m {
                        let mb = (m - i).min($mb);
                        match (nb, mb) {
                            (4, 4) => tile::<W, 4, 4>(x, k, w, yt, m, o, i),
                            (4, 3) => tile::<W, 4, 3>(x, k, w, yt, m, o, i),
                            (4, 2) => tile::<W, 4, 2>(x, k, w, yt, m, o, i),
                            (4, _) => tile::<W, 4, 1>(x, k, w, yt, m, o, i),
                            (_, 4) => tile::<W, 1, 4>(x, k, w, yt, m, o, i),
                            (_, 3) => tile::<W, 1, 3>(x, k, w, yt, m, o, i),
                            (_, 2) => tile::<W, 1, 2>(x, k, w, yt, m, o, i),
                            _ => tile::<W, 1, 1>(x, k, w, yt, m, o, i),
                        }
                        i += mb;
                    }
                    o += if nb == 4 { 4 } else { 1 };
                }
            }

            /// NB weight rows from `o` against MB rows of x from `i`: NB·MB accumulators in registers.
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn tile<W: Rows, const NB: usize, const MB: usize>(
                x: &[f32],
                k: usize,
                w: W,
                yt: &mut [f32],
                m: usize,
                o: usize,
                i: usize,
            ) {
                let mut acc = [[$zero(); MB]; NB];
                let vk = k / $lanes * $lanes;
                let xp = x.as_ptr();
                let mut c = 0;
                while c < vk {
                    let mut xs = [$zero(); MB];
                    for (j, xv) in xs.iter_mut().enumerate() {
                        *xv = $load(xp.add((i + j) * k + c));
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let wv = w.load((o + r) * k + c);
                        for (a, xv) in row.iter_mut().zip(&xs) {
                            *a = $fma(wv, *xv, *a);
                        }
                    }
                    c += $lanes;
                }
                for (r, row) in acc.iter().enumerate() {
                    for (j, a) in row.iter().enumerate() {
                        let mut s: f32 = $sum(*a);
                        for t in vk..k {
                            s += w.get((o + r) * k + t) * x[(i + j) * k + t];
                        }
                        yt[(o + r) * m + i + j] = s;
                    }
                }
            }
        }
    };
}

few_rows_kernel!(few_rows_avx512, "avx512f", __m512, 16, 4,
    zero: _mm512_setzero_ps, load: _mm512_loadu_ps, fma: _mm512_fmadd_ps,
    sum: |a| _mm512_reduce_add_ps(a),
    bf16: |p: *const u16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)))));

few_rows_kernel!(few_rows_avx2, "avx2,fma", __m256, 8, 2,
    zero: _mm256_setzero_ps, load: _mm256_loadu_ps, fma: _mm256_fmadd_ps,
    sum: |a: __m256| {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    },
    bf16: |p: *const u16| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))));
