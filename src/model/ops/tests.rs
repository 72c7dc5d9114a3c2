use super::*;
use candle_core::{Device, Var};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic values without a RNG dependency: a scrambled sine.
    let n: usize = shape.iter().product();
    let v: Vec<f32> =
        (0..n).map(|i| ((i as f32 * 12.9898 + seed as f32 * 78.233).sin() * 43758.547).fract() * 2.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Checks a fused op against the composed candle ops: same value, and the same gradients of
/// `Σ out·w` (w a fixed random weighting) for each input.
fn check<F, G>(inputs: &[Tensor], fused: F, composed: G, tol: f32)
where
    F: Fn(&[Tensor]) -> Tensor,
    G: Fn(&[Tensor]) -> Tensor,
{
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&ts), composed(&ts));
    assert_eq!(a.shape(), b.shape());
    assert!(max_diff(&a, &b) < tol, "values differ by {}", max_diff(&a, &b));
    let w = randn(a.dims(), 99);
    let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (x, y) = (ga.get(v).expect("fused gradient"), gb.get(v).expect("composed gradient"));
        assert!(max_diff(x, y) < tol, "gradient of input {i} differs by {}", max_diff(x, y));
    }
}

#[test]
fn rms_norm_matches_composed() {
    // Large enough to take the parallel path too.
    for rows in [3, 300] {
        check(
            &[randn(&[rows, 128], 1), randn(&[128], 2)],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| generic::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            1e-4,
        );
    }
}

#[test]
fn log_softmax_and_nll_match_composed() {
    let z = randn(&[7, 300], 4);
    check(
        std::slice::from_ref(&z),
        |t| log_softmax(&t[0], 0.5).unwrap(),
        |t| generic::log_softmax(&t[0], 0.5).unwrap(),
        1e-5,
    );
    let y = Tensor::new(&[0u32, 5, 299, 17, 3, 3, 100], &Device::Cpu).unwrap();
    let y2 = y.clone();
    check(&[z], move |t| nll_rows(&t[0], &y).unwrap(), move |t| generic::nll_rows(&t[0], &y2).unwrap(), 1e-5);
}

#[test]
fn nll_refuses_targets_outside_the_vocabulary() {
    let (z, y) = (randn(&[2, 4], 1), Tensor::new(&[1u32, 4], &Device::Cpu).unwrap());
    for err in [nll_rows(&z, &y).unwrap_err(), generic::nll_rows(&z, &y).unwrap_err()] {
        assert!(err.to_string().contains("target id 4"), "{err}");
    }
}

#[test]
fn rope_matches_rotate_half() {
    let (b, t, h, d) = (2, 5, 3, 8);
    let x = randn(&[b, t, h, d], 5);
    let ang = randn(&[b, t, d], 6);
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let (c2, s2) = (cos.clone(), sin.clone());
    check(&[x], |ts| rope(&ts[0], &cos, &sin).unwrap(), move |ts| generic::rope(&ts[0], &c2, &s2).unwrap(), 1e-5);
}

#[test]
fn silu_mul_matches_composed() {
    check(
        &[randn(&[4, 33], 7), randn(&[4, 33], 8)],
        |t| silu_mul(&t[0], &t[1]).unwrap(),
        |t| generic::silu_mul(&t[0], &t[1]).unwrap(),
        1e-5,
    );
}

#[test]
fn adamw_step_matches_the_formula() {
    // The fused in-place step and the generic one (what a GPU runs).
    for generic in [false, true] {
        let var = |v: &[f32]| Var::new(v, &Device::Cpu).unwrap();
        let (theta, m, v) = (var(&[1.0, -2.0, 0.5]), var(&[0.1, 0.0, -0.2]), var(&[0.01, 0.0, 0.04]));
        let g = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let (b1, b2, lr, eps, decay, scale) = (0.9f32, 0.99f32, 0.1f32, 1e-8f32, 0.95f32, 0.5f32);
        let (bc1, bc2) = (1.0 - b1 * b1, 1.0 - b2 * b2);
        let values = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        let (th0, m0, v0, g0) = (values(&theta), values(&m), values(&v), values(&g));
        let a = AdamwStep {
            grad_scale: scale as f64,
            betas: (b1 as f64, b2 as f64),
            bias: (bc1 as f64, bc2 as f64),
            lr: lr as f64,
            eps: eps as f64,
            decay: decay as f64,
        };
        let step = || adamw_step(&theta, &m, &v, &g, &a);
        if generic { with_generic_ops(step) } else { step() }.unwrap();
        let (th, m1, v1) = (values(&theta), values(&m), values(&v));
        for i in 0..3 {
            let gs = g0[i] * scale;
            let em = b1 * m0[i] + (1.0 - b1) * gs;
            let ev = b2 * v0[i] + (1.0 - b2) * gs * gs;
            let et = decay * th0[i] - lr * (em / bc1) / ((ev / bc2).sqrt() + eps);
            assert!(
                (m1[i] - em).abs() < 1e-6 && (v1[i] - ev).abs() < 1e-6 && (th[i] - et).abs() < 1e-6,
                "generic {generic}, {i}: {th:?} {m1:?} {v1:?}"
            );
        }
    }
}

/// The vector paths this CPU can run, lowest first.
fn simd_paths() -> Vec<simd::Level> {
    simd::available().into_iter().filter(|&l| l > simd::Level::Scalar).collect()
}

#[test]
fn few_row_matmul_matches_the_gemm_on_every_path() {
    for level in simd_paths() {
        simd::with_level(level, || {
            // Odd sizes exercise every tile shape and the scalar tail of K.
            for (m, k, n) in [(1, 40, 9), (3, 37, 130), (8, 512, 1536), (7, 64, 70)] {
                let x = randn(&[m, k], 11);
                let w = randn(&[n, k], 12);
                let y = matmul_few_rows(&x, &w).unwrap().expect("a vector path");
                let reference = x.matmul(&w.t().unwrap()).unwrap();
                assert!(max_diff(&y, &reference) < 1e-3, "{level:?} {m}x{k}x{n}: {}", max_diff(&y, &reference));
                // bf16 weights: exactly the f32 product of the rounded weights, in x's dtype.
                let wb = w.to_dtype(DType::BF16).unwrap();
                let y = matmul_few_rows(&x, &wb).unwrap().unwrap();
                let reference = x.matmul(&wb.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
                assert!(max_diff(&y, &reference) < 1e-3, "{level:?} bf16 {m}x{k}x{n}: {}", max_diff(&y, &reference));
                let yb = matmul_few_rows(&x.to_dtype(DType::BF16).unwrap(), &wb).unwrap().unwrap();
                assert_eq!(yb.dtype(), DType::BF16);
            }
        })
    }
    assert!(matmul_few_rows(&randn(&[FEW_ROWS + 1, 8], 1), &randn(&[4, 8], 2)).unwrap().is_none());
    let generic = with_generic_ops(|| matmul_few_rows(&randn(&[1, 8], 1), &randn(&[4, 8], 2)).unwrap());
    assert!(generic.is_none(), "off the fused path, the GEMM");
    let scalar = simd::with_level(simd::Level::Scalar, || matmul_few_rows(&randn(&[1, 8], 1), &randn(&[4, 8], 2)));
    assert!(scalar.unwrap().is_none(), "without a vector extension, the GEMM");
}

#[test]
fn decode_attention_matches_the_composed_attention() {
    // 2 rows, 4 query heads over 2 kv heads, 5 cached positions; keys and values are
    // strided views of a larger buffer, as the KV cache hands them out.
    let (b, h, kh, s, d) = (2, 4, 2, 5, 8);
    let q = randn(&[b, h, 1, d], 20);
    let k = randn(&[b, kh, 7, d], 21).narrow(2, 0, s).unwrap();
    let v = randn(&[b, kh, 7, d], 22).narrow(2, 0, s).unwrap();
    let mut m = vec![0f32; b * s];
    m[s] = -1e9; // row 1 is left-padded by one position
    let mask = Tensor::from_vec(m, (b, 1, 1, s), &Device::Cpu).unwrap();
    let want = generic::decode_attention(&q, &k, &v, 0.25, Some(&mask)).unwrap();
    let scalar = simd::with_level(simd::Level::Scalar, || decode_attention(&q, &k, &v, 0.25, Some(&mask)).unwrap());
    assert_eq!(scalar.dims(), want.dims());
    assert!(max_diff(&scalar, &want) < 1e-5, "{}", max_diff(&scalar, &want));
    // Every vector path computes the same operations in the same order: the same bits.
    for level in simd_paths() {
        let got = simd::with_level(level, || decode_attention(&q, &k, &v, 0.25, Some(&mask)).unwrap());
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            scalar.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{level:?}"
        );
    }
}

#[test]
fn attention_matches_composed_with_grouped_heads_and_a_mask() {
    let (b, h, kh, t, d) = (2, 4, 2, 5, 8);
    let mut m = vec![0f32; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                if j > i || (bi == 1 && j == 0 && i != 0) {
                    m[(bi * t + i) * t + j] = -1e9; // causal; row 1 left-padded by one
                }
            }
        }
    }
    let mask = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap();
    let mk = mask.clone();
    let composed = move |ts: &[Tensor]| generic::attention(&ts[0], &ts[1], &ts[2], 0.3, Some(&mk)).unwrap();
    check(
        &[randn(&[b, h, t, d], 30), randn(&[b, kh, t, d], 31), randn(&[b, kh, t, d], 32)],
        |ts| attention(&ts[0], &ts[1], &ts[2], 0.3, Some(&mask)).unwrap(),
        composed,
        1e-4,
    );
}

/// Values as bf16 (round to nearest even) widened back to f32.
fn bf16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn bf16_linear_is_the_product_of_rounded_inputs_with_close_gradients() {
    if !bf16_gemm_available(&Device::Cpu) {
        eprintln!("this CPU has no avx512_bf16 (or KDLLM_SIMD caps it): the bf16 GEMM is compiled, not run");
        assert!(linear_bf16(&randn(&[3, 4], 1), &randn(&[5, 4], 2)).unwrap().dims() == [3, 5]);
        return;
    }
    // Edges of every blocking: rows past a task (112) and a micro-tile (14), columns past a
    // strip (32), k odd and past a panel (2 · 192).
    for (rows, n, k) in [(2 * 150, 70, 2 * 192 + 3), (5, 33, 7), (14, 32, 2)] {
        let (x, w) = (randn(&[2, rows / 2, k], 1), randn(&[n, k], 2));
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = linear_bf16(xv.as_tensor(), wv.as_tensor()).unwrap();
        assert_eq!(y.dims(), [2, rows / 2, n]);
        // Products of bf16 values are exact in f32: only the order of the sums differs.
        let exact = bf16_rounded(&x).broadcast_matmul(&bf16_rounded(&w).t().unwrap()).unwrap();
        let scale = max_abs(&exact);
        assert!(max_diff(&y, &exact) <= 1e-5 * scale * (k as f32).sqrt(), "{rows}x{n}x{k}: {}", max_diff(&y, &exact));

        // The gradients, against the f32 product's: within bf16 rounding of dy and the operands.
        let weights = randn(y.dims(), 3);
        let g = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let (xr, wr) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let reference = (xr.as_tensor().broadcast_matmul(&wr.as_tensor().t().unwrap()).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap();
        let gr = reference.backward().unwrap();
        for (name, a, b) in [("x", &xv, &xr), ("w", &wv, &wr)] {
            let (ga, gb) = (g.get(a).expect("bf16 gradient"), gr.get(b).expect("f32 gradient"));
            assert_eq!(ga.dims(), gb.dims());
            let rel = max_diff(ga, gb) / max_abs(gb);
            assert!(rel > 0.0 && rel < 2e-2, "{rows}x{n}x{k}: d{name} differs by {rel} of its scale");
        }
    }
}

#[test]
fn bf16_linear_gives_the_same_bits_on_any_thread_count() {
    if !bf16_gemm_available(&Device::Cpu) {
        return eprintln!("this CPU has no avx512_bf16: skipped");
    }
    let (x, w) = (randn(&[400, 96], 4), randn(&[64, 96], 5));
    let many = linear_bf16(&x, &w).unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let one = pool.install(|| linear_bf16(&x, &w).unwrap());
    assert_eq!(max_diff(&many, &one), 0.0);
}

#[test]
fn exp_or_zero_is_exp_to_the_bit() {
    // Around the cut, through the subnormal results, and far below it (masked scores).
    let mut x = -110.0f32;
    while x < -80.0 {
        assert_eq!(exp_or_zero(x).to_bits(), x.exp().to_bits(), "at {x}");
        x += 0.001;
    }
    for x in [-1e9f32, f32::MIN, f32::NEG_INFINITY, -0.5, 0.0, 3.0] {
        assert_eq!(exp_or_zero(x).to_bits(), x.exp().to_bits(), "at {x}");
    }
}
