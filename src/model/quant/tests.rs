use super::*;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// `values` (rows, cols) encoded by candle's (ggml's) quantizer as `ty`: its bytes and what
/// candle dequantizes them to.
fn ggml(values: &[f32], rows: usize, cols: usize, ty: GgmlDType) -> (Vec<u8>, Vec<f32>) {
    let t = Tensor::from_slice(values, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, ty).unwrap();
    let back = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (q.data().unwrap().into_owned(), back)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn ggml_blocks_dequantize_as_candle_does() {
    let (rows, cols) = (6, 512);
    let values = random(rows * cols, 1);
    for (ty, tol) in [
        (GgmlDType::Q8_0, 0.0),
        (GgmlDType::Q4_0, 0.0),
        (GgmlDType::Q4_1, 0.0),
        // Q4_K's d·sc and dmin·mn rounded to f16: ≤ 2⁻¹¹·(|d·sc·q| + |dmin·mn|), about 2⁻¹¹·3
        // for values in [−1, 1].
        (GgmlDType::Q4K, 1.5e-3),
    ] {
        let (bytes, want) = ggml(&values, rows, cols, ty);
        let m = QMatrix::from_ggml(ty, &bytes, rows, cols).unwrap();
        let diff = max_abs_diff(&m.dequantize(), &want);
        assert!(diff <= tol, "{ty:?}: dequantized values differ from candle's by {diff}");
        // Row selection picks whole rows.
        let picked = m.select_rows(&[4, 1]).dequantize();
        assert_eq!(&picked[..cols], &m.dequantize_rows(&[4])[..]);
        assert_eq!(&picked[cols..], &m.dequantize_rows(&[1])[..]);
    }
}

#[test]
fn wrong_sizes_and_unsupported_types_are_refused() {
    let (bytes, _) = ggml(&random(64, 2), 2, 32, GgmlDType::Q8_0);
    let err = QMatrix::from_ggml(GgmlDType::Q8_0, &bytes[1..], 2, 32).unwrap_err();
    assert!(err.contains("expected 68"), "{err}");
    let err = QMatrix::from_ggml(GgmlDType::Q6K, &[], 1, 256).unwrap_err();
    assert!(err.contains("Q6K has no quantized kernel"), "{err}");
    assert!(QMatrix::q8_0(&random(48, 3), 1, 48).is_none(), "48 is not whole blocks of 32");
}

#[test]
fn a_q4_1_dot_product_by_hand() {
    // One block: d = 1, m = 0.5, codes q_j = j mod 16, so w_j = (j mod 16) + 0.5.
    let mut block = f16::from_f32(1.0).to_le_bytes().to_vec();
    block.extend(f16::from_f32(0.5).to_le_bytes());
    block.extend((0..16u8).map(|j| j | (j << 4)));
    let w = Arc::new(QMatrix { rows: 1, cols: 32, format: QFormat::Q4_1, data: Arc::new(block) });
    // x = 1 everywhere: Σ w_j = 2·(0 + … + 15) + 32·0.5 = 256. x quantizes exactly (127·(1/127)).
    let x = Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap();
    for level in simd::available() {
        let y = simd::with_level(level, || w.matmul(&x)).unwrap().to_vec2::<f32>().unwrap();
        assert!((y[0][0] - 256.0).abs() < 1e-3, "{}: {}", level.name(), y[0][0]);
    }
}

/// The quantized product against the f32 product of the same (dequantized) weights: the error
/// is x's 8-bit rounding, ≤ ½·amax/127 per value of each block of 32.
#[test]
fn quantized_matmul_is_close_to_the_f32_product_on_every_path() {
    // 70 rows: two tasks and a partial one; 11 blocks: odd for AVX-512, and the Q4_1 offsets in
    // a whole and a partial group of eight.
    let (n, k, m) = (70, 352, 5);
    let x = random(m * k, 4);
    let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let (bytes, _) = ggml(&random(n * k, 5), n, k, ty);
        let w = Arc::new(QMatrix::from_ggml(ty, &bytes, n, k).unwrap());
        let wd = w.dequantize();
        let wf = Tensor::from_slice(&wd, (n, k), &Device::Cpu).unwrap();
        let want = xt.matmul(&wf.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let mut scalar: Option<Vec<Vec<f32>>> = None;
        for level in simd::available() {
            let got = simd::with_level(level, || w.matmul(&xt)).unwrap().to_vec2::<f32>().unwrap();
            for i in 0..m {
                for o in 0..n {
                    // Σ_j |w_oj|·(amax of x's block of j)/254.
                    let bound: f32 = (0..k)
                        .map(|j| {
                            let block = &x[i * k + j / QK * QK..][..QK];
                            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                            wd[o * k + j].abs() * amax / 254.0
                        })
                        .sum();
                    let err = (got[i][o] - want[i][o]).abs();
                    assert!(err <= bound * 1.01 + 1e-5, "{ty:?} {}: y[{i}][{o}] off by {err} > {bound}", level.name());
                }
            }
            // AVX2 and AVX-512 run one body: the same bits. The scalar path differs only in the
            // f32 order of the exact block sums.
            if level == simd::Level::Avx512 {
                let avx2 = simd::with_level(simd::Level::Avx2, || w.matmul(&xt)).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(avx2, got, "{ty:?}: avx512 and avx2 differ");
            }
            match &scalar {
                None => scalar = Some(got),
                Some(s) => {
                    let diff = s.iter().zip(&got).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f32::max);
                    assert!(diff < 1e-4, "{ty:?}: {} differs from scalar by {diff}", level.name());
                }
            }
        }
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
    let (n, k) = (300, 128);
    let (bytes, _) = ggml(&random(n * k, 6), n, k, GgmlDType::Q4_1);
    let w = Arc::new(QMatrix::from_ggml(GgmlDType::Q4_1, &bytes, n, k).unwrap());
    // 41 rows: a panel of 32 and tiles of 8, 4 and 1 after it.
    let x = Tensor::from_vec(random(41 * k, 7), (41, k), &Device::Cpu).unwrap();
    for level in simd::available() {
        let mm = |x: &Tensor| simd::with_level(level, || w.matmul(x)).unwrap().to_vec2::<f32>().unwrap();
        let batch = mm(&x);
        for (i, row) in batch.iter().enumerate() {
            let alone = mm(&x.narrow(0, i, 1).unwrap());
            assert_eq!(alone[0], *row, "{}: row {i} alone differs from row {i} of the batch", level.name());
        }
        let pair = mm(&x.narrow(0, 3, 2).unwrap());
        assert_eq!(pair[1], batch[4], "{}", level.name());
    }
}

#[test]
fn a_group_of_matrices_gives_each_ones_own_product() {
    let k = 64;
    let mats: Vec<Arc<QMatrix>> = [(40, GgmlDType::Q4_1), (7, GgmlDType::Q8_0), (33, GgmlDType::Q4_1)]
        .iter()
        .enumerate()
        .map(|(i, &(n, ty))| {
            Arc::new(QMatrix::from_ggml(ty, &ggml(&random(n * k, 10 + i as u64), n, k, ty).0, n, k).unwrap())
        })
        .collect();
    let x = Tensor::from_vec(random(3 * k, 9), (3, k), &Device::Cpu).unwrap();
    for level in simd::available() {
        let group = simd::with_level(level, || QMatrix::matmul_group(&mats, &x)).unwrap();
        assert_eq!(group.len(), 3);
        for (w, y) in mats.iter().zip(&group) {
            let alone = simd::with_level(level, || w.matmul(&x)).unwrap();
            assert_eq!(y.dims(), [3, w.rows()]);
            assert_eq!(y.to_vec2::<f32>().unwrap(), alone.to_vec2::<f32>().unwrap(), "{}", level.name());
        }
    }
}

#[test]
fn activation_blocks_quantize_alike_on_every_path() {
    let mut x = random(4 * QK, 11);
    x[5] = -3.0; // the largest magnitude is negative
    x[QK..2 * QK].fill(0.0); // an all-zero block: scale 0, codes 0
    for level in simd::available() {
        for block in x.chunks_exact(QK) {
            let (mut want, mut got) = ([0i8; QK], [0i8; QK]);
            let reference = quantize_block(block, &mut want, simd::Level::Scalar);
            assert_eq!(quantize_block(block, &mut got, level), reference, "{}", level.name());
            assert_eq!(got, want, "{}: codes", level.name());
            assert_eq!(reference.1, want.iter().map(|&c| c as i32).sum::<i32>());
        }
    }
    let (mut codes, amax) = ([0i8; QK], 3.0);
    quantize_block(&x[..QK], &mut codes, simd::level());
    assert_eq!(codes[5], -127, "the largest magnitude takes the extreme code (amax {amax})");
}
