//! Every divergence against a straight-line f64 reference on hand-made rows.

use super::*;
use candle_core::{Device, Var};

const ALL: [Divergence; 7] = Divergence::ALL;

fn t2(rows: &[Vec<f64>]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().map(|&x| x as f32)).collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn num(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn measure(divergence: Divergence, beta: f64, skew: f64) -> Measure {
    Measure { divergence, beta, skew }
}

fn softmax(z: &[f64], t: f64) -> Vec<f64> {
    let m = z.iter().map(|x| x / t).fold(f64::MIN, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x / t - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// The reference buckets of one row: (p, q) over [top-k..., tail], padding slots (−∞) dropped.
fn ref_topk(z: &[f64], id: &[u32], l: &[f64], t: f64) -> (Vec<f64>, Vec<f64>) {
    let q = softmax(z, t);
    let real: Vec<usize> = (0..id.len()).filter(|&k| l[k].is_finite()).collect();
    let mut qb: Vec<f64> = real.iter().map(|&k| q[id[k] as usize]).collect();
    qb.push((1.0 - qb.iter().sum::<f64>()).max(MIN_TAIL));
    let mut pl: Vec<f64> = real.iter().map(|&k| l[k]).collect();
    pl.push((1.0 - pl.iter().map(|x| x.exp()).sum::<f64>()).max(0.0).ln());
    let mut p = softmax(&pl, t);
    let tail = p.len() - 1;
    p[tail] = p[tail].max(MIN_TAIL);
    (p, qb)
}

fn kl(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).filter(|(a, _)| **a > 0.0).map(|(a, b)| a * (a / b).ln()).sum()
}

fn mix(a: &[f64], b: &[f64], w: f64) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| w * a + (1.0 - w) * b).collect()
}

/// The definitions, written out.
fn ref_div(m: Measure, p: &[f64], q: &[f64]) -> f64 {
    match m.divergence {
        Divergence::ForwardKl => kl(p, q),
        Divergence::ReverseKl => kl(q, p),
        Divergence::Jsd if m.beta == 0.0 => kl(p, q),
        Divergence::Jsd if m.beta == 1.0 => kl(q, p),
        Divergence::Jsd => {
            let mm = mix(p, q, m.beta);
            m.beta * kl(p, &mm) + (1.0 - m.beta) * kl(q, &mm)
        }
        Divergence::SkewKl => kl(p, &mix(p, q, m.skew)),
        Divergence::SkewReverseKl => kl(q, &mix(q, p, m.skew)),
        Divergence::Tvd => 0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>(),
        Divergence::Akl => {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
            let (mut cum, mut gh, mut gt) = (0.0, 0.0, 0.0);
            for (rank, &i) in order.iter().enumerate() {
                cum += p[i];
                if rank == 0 || cum <= AKL_HEAD_MASS {
                    gh += (p[i] - q[i]).abs();
                } else {
                    gt += (p[i] - q[i]).abs();
                }
            }
            (gh * kl(p, q) + gt * kl(q, p)) / (gh + gt)
        }
    }
}

fn ref_scale(d: Divergence, t: f64) -> f64 {
    if d == Divergence::Tvd {
        1.0
    } else {
        t * t
    }
}

/// Rows of student logits, teacher top-k ids and teacher log-probs.
type TopkRows = (Vec<Vec<f64>>, Vec<Vec<u32>>, Vec<Vec<f64>>);

/// Student logits over 6 tokens and the teacher's stored top-3 (the second row padded: a
/// mixture row with two real buckets).
fn rows_topk() -> TopkRows {
    let z = vec![vec![1.0, -0.5, 2.0, 0.3, -1.2, 0.0], vec![0.1, 0.2, -0.3, 1.5, 0.0, -2.0], vec![0.0; 6]];
    let id = vec![vec![2, 0, 3], vec![3, 1, 0], vec![5, 4, 1]];
    let l = vec![vec![-0.4, -1.6, -2.1], vec![-0.2, -2.5, f64::NEG_INFINITY], vec![-0.1, -3.0, -4.0]];
    (z, id, l)
}

fn check_topk(m: Measure, t: f64) {
    let (z, id, l) = rows_topk();
    let got = num(&topk(m, &t2(&z), &ids(&id), &t2(&l), t).unwrap());
    let want: f64 = (0..z.len())
        .map(|r| {
            let (p, q) = ref_topk(&z[r], &id[r], &l[r], t);
            ref_div(m, &p, &q)
        })
        .sum::<f64>()
        * ref_scale(m.divergence, t)
        / z.len() as f64;
    assert!((got - want).abs() < 2e-5 * (1.0 + want.abs()), "{m:?} T={t}: {got} vs {want}");
}

#[test]
fn every_divergence_matches_the_reference_over_topk_and_tail() {
    for d in ALL {
        for t in [1.0, 2.0] {
            check_topk(measure(d, 0.5, 0.1), t);
        }
    }
    for b in [0.1, 0.9] {
        check_topk(measure(Divergence::Jsd, b, 0.0), 1.0);
    }
    for a in [0.3, 0.7] {
        check_topk(measure(Divergence::SkewKl, 0.0, a), 1.5);
        check_topk(measure(Divergence::SkewReverseKl, 0.0, a), 1.5);
    }
}

#[test]
fn every_divergence_matches_the_reference_over_the_full_vocabulary() {
    let zs = vec![vec![1.0, -0.5, 2.0, 0.3, -1.2], vec![0.0, 0.0, 0.0, 0.0, 3.0]];
    let zt = vec![vec![0.2, 0.1, 2.5, -1.0, 0.0], vec![-1.0, 2.0, 0.5, 0.5, 0.0]];
    for d in ALL {
        for t in [1.0, 3.0] {
            let m = measure(d, 0.3, 0.2);
            let got = num(&full(m, &t2(&zs), &t2(&zt), t).unwrap());
            let want = (0..2).map(|r| ref_div(m, &softmax(&zt[r], t), &softmax(&zs[r], t))).sum::<f64>()
                * ref_scale(d, t)
                / 2.0;
            assert!((got - want).abs() < 2e-5 * (1.0 + want), "{m:?} T={t}: {got} vs {want}");
        }
    }
}

#[test]
fn the_endpoints_are_the_kls_they_are_defined_as() {
    let (z, id, l) = rows_topk();
    let v = |m: Measure| num(&topk(m, &t2(&z), &ids(&id), &t2(&l), 2.0).unwrap());
    let (fkl, rkl) = (v(measure(Divergence::ForwardKl, 0.0, 0.0)), v(measure(Divergence::ReverseKl, 0.0, 0.0)));
    assert!(fkl > 0.01 && rkl > 0.01 && (fkl - rkl).abs() > 1e-3, "{fkl} {rkl}");
    assert!((v(measure(Divergence::Jsd, 0.0, 0.0)) - fkl).abs() < 1e-6);
    assert!((v(measure(Divergence::Jsd, 1.0, 0.0)) - rkl).abs() < 1e-6);
    assert!((v(measure(Divergence::SkewKl, 0.0, 0.0)) - fkl).abs() < 1e-6);
    assert!((v(measure(Divergence::SkewReverseKl, 0.0, 0.0)) - rkl).abs() < 1e-6);
    assert!(v(measure(Divergence::SkewKl, 0.0, 1.0)).abs() < 1e-7);
    assert!(v(measure(Divergence::SkewReverseKl, 0.0, 1.0)).abs() < 1e-7);
    // Inside (0, 1) the JSD is bounded by ln 2 per position (times T²) and shrinks to 0 at the ends.
    for b in [1e-4, 0.5, 1.0 - 1e-4] {
        let j = v(measure(Divergence::Jsd, b, 0.0));
        assert!((0.0..=4.0 * 2f64.ln()).contains(&j), "β={b}: {j}");
    }
    assert!(v(measure(Divergence::Jsd, 1e-4, 0.0)) < 1e-3 * fkl);
}

#[test]
fn a_teacher_with_all_its_mass_in_the_topk() {
    // Top-2 of the teacher sums to 1: the tail bucket sits at MIN_TAIL and stays finite.
    let z = vec![vec![0.3, 0.1, -0.2, 0.4]];
    let (id, l) = (vec![vec![1, 3]], vec![vec![0.75f64.ln(), 0.25f64.ln()]]);
    for d in ALL {
        for t in [1.0, 2.0] {
            let m = measure(d, 0.5, 0.1);
            let got = num(&topk(m, &t2(&z), &ids(&id), &t2(&l), t).unwrap());
            let (p, q) = ref_topk(&z[0], &id[0], &l[0], t);
            let want = ref_div(m, &p, &q) * ref_scale(d, t);
            assert!(got.is_finite() && (got - want).abs() < 1e-4 * (1.0 + want), "{d:?}: {got} vs {want}");
        }
    }
}

#[test]
fn an_empty_selection_gives_zero() {
    let z = Tensor::zeros((0, 5), DType::F32, &Device::Cpu).unwrap();
    let id = Tensor::zeros((0, 2), DType::U32, &Device::Cpu).unwrap();
    let l = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
    for d in ALL {
        let m = measure(d, 0.5, 0.1);
        assert_eq!(num(&topk(m, &z, &id, &l, 2.0).unwrap()), 0.0);
        assert_eq!(num(&full(m, &z, &z, 2.0).unwrap()), 0.0);
        let h = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(num(&full_chunked(m, &z, &h, &|x| x.matmul(&x.t()?), 2.0, 4).unwrap()), 0.0);
    }
}

#[test]
fn bf16_inputs_are_never_negative() {
    // A student equal to its teacher (the divergence is 0 and rounding decides its sign) and
    // a student close to it, both in bf16.
    let zt = vec![vec![0.31, -1.7, 2.2, 0.05, -0.4, 1.1], vec![3.0, 2.9, 2.8, -5.0, 0.0, 0.1]];
    let near: Vec<Vec<f64>> = zt.iter().map(|r| r.iter().map(|x| x + 0.004).collect()).collect();
    let bf = |r: &[Vec<f64>]| t2(r).to_dtype(DType::BF16).unwrap();
    let id = vec![vec![2, 5, 0], vec![0, 1, 2]];
    let lp = log_softmax(&t2(&zt), 1.0).unwrap().gather(&ids(&id), 1).unwrap().to_dtype(DType::BF16).unwrap();
    for d in ALL {
        for b in [0.0, 0.5, 1.0] {
            let m = measure(d, b, b);
            for student in [bf(&zt), bf(&near)] {
                for t in [1.0, 2.0] {
                    let f = rows(
                        m,
                        &full_buckets(&student, &bf(&zt), t).unwrap().0,
                        &full_buckets(&student, &bf(&zt), t).unwrap().1,
                    )
                    .unwrap();
                    let k = topk_buckets(&student, &ids(&id), &lp, t).unwrap();
                    let k = rows(m, &k.0, &k.1).unwrap();
                    for v in f.to_vec1::<f32>().unwrap().into_iter().chain(k.to_vec1::<f32>().unwrap()) {
                        assert!((0.0..0.1).contains(&v), "{d:?} β/α={b} T={t}: {v}");
                    }
                }
            }
        }
    }
}

#[test]
fn the_gradient_reaches_the_logits_and_matches_finite_differences() {
    let (z, id, l) = rows_topk();
    for d in ALL {
        let m = measure(d, 0.4, 0.2);
        let var = Var::from_tensor(&t2(&z)).unwrap();
        let loss = topk(m, var.as_tensor(), &ids(&id), &t2(&l), 2.0).unwrap();
        let grad = loss.backward().unwrap().get(&var).unwrap().to_vec2::<f32>().unwrap();
        // Central difference on one logit of the first row, in f64 through the reference.
        let f = |dz: f64| {
            let mut zz = z.clone();
            zz[0][2] += dz;
            (0..zz.len())
                .map(|r| {
                    let (p, q) = ref_topk(&zz[r], &id[r], &l[r], 2.0);
                    ref_div(m, &p, &q)
                })
                .sum::<f64>()
                * ref_scale(d, 2.0)
                / zz.len() as f64
        };
        let fd = (f(1e-5) - f(-1e-5)) / 2e-5;
        // AKL's weights are held constant in the gradient; the reference moves them too.
        if d != Divergence::Akl {
            assert!((grad[0][2] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "{d:?}: {} vs {fd}", grad[0][2]);
        }
        assert!(grad.iter().flatten().all(|g| g.is_finite()) && grad[0].iter().any(|g| *g != 0.0), "{d:?}");
    }
}

#[test]
fn chunked_full_vocabulary_matches_the_whole_in_value_and_gradient() {
    // Teacher logits = hidden · Wᵀ; 5 rows in chunks of 2 (the last chunk is short).
    let hidden = t2(&[
        vec![0.1, 0.5, -0.3],
        vec![1.0, -1.0, 0.2],
        vec![0.0, 0.3, 0.3],
        vec![-0.7, 0.2, 0.9],
        vec![0.4, 0.4, -0.1],
    ]);
    let w = t2(&[vec![1.0, 0.0, 0.5], vec![-0.5, 1.0, 0.0], vec![0.2, 0.2, 0.2], vec![0.0, -1.0, 1.0]]);
    let head = |h: &Tensor| h.matmul(&w.t()?);
    let zs = t2(&[
        vec![0.3, -0.2, 0.0, 1.0],
        vec![1.0, 1.0, -1.0, 0.0],
        vec![0.0, 0.0, 0.0, 0.0],
        vec![2.0, -2.0, 0.5, 0.1],
        vec![-0.3, 0.6, 0.2, 0.0],
    ]);
    for d in ALL {
        let m = measure(d, 0.5, 0.1);
        let (a, b) = (Var::from_tensor(&zs).unwrap(), Var::from_tensor(&zs).unwrap());
        let whole = full(m, &(a.as_tensor() * 1.0).unwrap(), &head(&hidden).unwrap(), 2.0).unwrap();
        let chunked = full_chunked(m, &(b.as_tensor() * 1.0).unwrap(), &hidden, &head, 2.0, 2).unwrap();
        assert!((num(&whole) - num(&chunked)).abs() < 1e-6, "{d:?}: {} vs {}", num(&whole), num(&chunked));
        let ga = whole.backward().unwrap().get(&a).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gb = chunked.backward().unwrap().get(&b).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-6, "{d:?}: {x} vs {y}");
        }
    }
}
