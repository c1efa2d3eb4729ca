//! Every backward op of the CPU backend against central finite differences of its forward op, in f64, on
//! random inputs of awkward sizes (odd channel counts, batch > 1, non-square images), and every forward op
//! that has a simple definition against that definition written out here.
//!
//! The check: with a fixed random `r`, `L(x) = sum(r * f(x))`; the op's backward with `dy = r` must give
//! `dL/dx`, compared with `(L(x + h e_i) - L(x - h e_i)) / 2h` at sampled coordinates, `h = 1e-5`.
//! Central differences have error O(h^2 f''') ~ 1e-10 and rounding error ~1e-16 |L| / h ~ 1e-11, so
//! `|num - ana| <= 1e-7 + 1e-6 |ana|` leaves a wide margin while catching any real mistake (those are O(1)).

#![allow(clippy::too_many_arguments)]

mod common;

use ddpm_cuda::backend::cpu::CpuBackend;
use ddpm_cuda::backend::{
    AttentionShape, Backend, ConvKind, ConvShape, GroupNormShape, Stream, Tensor,
};
use ddpm_cuda::rng;

type Be = CpuBackend<f64>;

struct Rand(u64);
impl Rand {
    fn fill(&mut self, be: &mut Be, t: Tensor, scale: f64) {
        self.0 += 1;
        let s = be.slice_mut(t).unwrap();
        for (i, v) in s.iter_mut().enumerate() {
            *v = scale * f64::from(rng::normal(99, self.0, i as u64));
        }
    }
}

fn dot(be: &Be, a: Tensor, b: Tensor) -> f64 {
    be.slice(a)
        .unwrap()
        .iter()
        .zip(be.slice(b).unwrap())
        .map(|(x, y)| x * y)
        .sum()
}

/// Checks `grads[i]` (written by `backward`) against finite differences of `sum(r * out)` in `inputs[i]`.
fn check(
    be: &mut Be,
    what: &str,
    inputs: &[Tensor],
    grads: &[Tensor],
    out: Tensor,
    r: Tensor,
    forward: &dyn Fn(&mut Be),
    backward: &dyn Fn(&mut Be),
) {
    forward(be);
    backward(be);
    let h = 1e-5;
    for (k, (&x, &g)) in inputs.iter().zip(grads).enumerate() {
        let ana: Vec<f64> = be.slice(g).unwrap().to_vec();
        // Up to 60 coordinates per input, spread over the whole tensor.
        let step = (x.len / 60).max(1);
        for i in (0..x.len).step_by(step) {
            let orig = be.slice(x).unwrap()[i];
            be.slice_mut(x).unwrap()[i] = orig + h;
            forward(be);
            let lp = dot(be, out, r);
            be.slice_mut(x).unwrap()[i] = orig - h;
            forward(be);
            let lm = dot(be, out, r);
            be.slice_mut(x).unwrap()[i] = orig;
            let num = (lp - lm) / (2.0 * h);
            assert!(
                (num - ana[i]).abs() <= 1e-7 + 1e-6 * ana[i].abs(),
                "{what}: input {k}, element {i}: finite difference {num}, backward {}",
                ana[i]
            );
        }
    }
}

fn alloc(be: &mut Be, len: usize) -> Tensor {
    be.alloc(len).unwrap()
}

#[test]
fn conv2d_gradients() {
    for (kind, h, w, c, o) in [
        (ConvKind::K3S1, 5, 7, 3, 5),
        (ConvKind::K3S2, 6, 8, 3, 4),
        (ConvKind::K3S2, 5, 7, 5, 3),
        (ConvKind::K1, 4, 3, 7, 5),
    ] {
        let s = ConvShape {
            n: 2,
            h,
            w,
            c,
            o,
            kind,
        };
        let mut be = Be::new();
        let mut rnd = Rand(1);
        let (x, wt, b, y, r) = (
            alloc(&mut be, s.x_len()),
            alloc(&mut be, s.w_len()),
            alloc(&mut be, o),
            alloc(&mut be, s.y_len()),
            alloc(&mut be, s.y_len()),
        );
        let (dx, dw, db) = (
            alloc(&mut be, s.x_len()),
            alloc(&mut be, s.w_len()),
            alloc(&mut be, o),
        );
        for (t, sc) in [(x, 1.0), (wt, 0.5), (b, 0.5), (r, 1.0)] {
            rnd.fill(&mut be, t, sc);
        }
        check(
            &mut be,
            &format!("conv2d {kind:?} {h}x{w}"),
            &[x, wt, b],
            &[dx, dw, db],
            y,
            r,
            &|be| be.conv2d_forward(s, x, wt, b, y).unwrap(),
            &|be| {
                be.conv2d_backward_data(s, r, wt, dx, false).unwrap();
                be.conv2d_backward_weight(s, x, r, dw, db).unwrap();
            },
        );
    }
}

/// The forward convolution against its definition, written as nested loops (weights [o, kh, kw, c]; the
/// stride-2 kind pads only bottom and right, so tap (0, 0) of output (0, 0) reads input (0, 0)).
#[test]
fn conv2d_forward_matches_definition() {
    for (kind, h, w) in [
        (ConvKind::K3S1, 5, 6),
        (ConvKind::K3S2, 7, 6),
        (ConvKind::K1, 3, 5),
    ] {
        let s = ConvShape {
            n: 2,
            h,
            w,
            c: 3,
            o: 4,
            kind,
        };
        let mut be = Be::new();
        let mut rnd = Rand(7);
        let (x, wt, b, y) = (
            alloc(&mut be, s.x_len()),
            alloc(&mut be, s.w_len()),
            alloc(&mut be, 4),
            alloc(&mut be, s.y_len()),
        );
        for t in [x, wt, b] {
            rnd.fill(&mut be, t, 1.0);
        }
        be.conv2d_forward(s, x, wt, b, y).unwrap();
        let (xs, ws, bs, ys) = (
            be.slice(x).unwrap(),
            be.slice(wt).unwrap(),
            be.slice(b).unwrap(),
            be.slice(y).unwrap(),
        );
        let (oh, ow) = s.out_hw();
        let (k, st, pad) = match kind {
            ConvKind::K3S1 => (3, 1, 1isize),
            ConvKind::K3S2 => (3, 2, 0),
            ConvKind::K1 => (1, 1, 0),
        };
        assert_eq!(
            (oh, ow),
            if kind == ConvKind::K3S2 {
                (3, 3)
            } else {
                (h, w)
            }
        );
        for n in 0..2 {
            for i in 0..oh {
                for j in 0..ow {
                    for o in 0..4 {
                        let mut acc = bs[o];
                        for r in 0..k {
                            for t in 0..k {
                                let (ih, iw) =
                                    ((i * st + r) as isize - pad, (j * st + t) as isize - pad);
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                    continue;
                                }
                                for c in 0..3 {
                                    acc += ws[((o * k + r) * k + t) * 3 + c]
                                        * xs[((n * h + ih as usize) * w + iw as usize) * 3 + c];
                                }
                            }
                        }
                        let got = ys[((n * oh + i) * ow + j) * 4 + o];
                        assert!(
                            (got - acc).abs() < 1e-12,
                            "{kind:?} ({n},{i},{j},{o}): {got} vs {acc}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn group_norm_gradients_with_and_without_silu() {
    for silu in [false, true] {
        let s = GroupNormShape {
            n: 2,
            hw: 7,
            c: 6,
            groups: 3,
            eps: 1e-6,
        };
        let mut be = Be::new();
        let mut rnd = Rand(2);
        let (x, g, b, y, m, rs, r) = (
            alloc(&mut be, s.len()),
            alloc(&mut be, 6),
            alloc(&mut be, 6),
            alloc(&mut be, s.len()),
            alloc(&mut be, 6),
            alloc(&mut be, 6),
            alloc(&mut be, s.len()),
        );
        let (dx, dg, db) = (
            alloc(&mut be, s.len()),
            alloc(&mut be, 6),
            alloc(&mut be, 6),
        );
        for t in [x, g, b, r] {
            rnd.fill(&mut be, t, 1.0);
        }
        check(
            &mut be,
            &format!("group norm silu={silu}"),
            &[x, g, b],
            &[dx, dg, db],
            y,
            r,
            &|be| be.group_norm_forward(s, x, g, b, y, m, rs, silu).unwrap(),
            &|be| {
                be.group_norm_backward(s, x, g, b, m, rs, r, dx, dg, db, silu, false)
                    .unwrap()
            },
        );
        // Definition: each (image, group) of the normalised output has mean 0 and variance 1 (before the
        // affine map), here checked with gamma = 1, beta = 0 and no SiLU.
        if !silu {
            be.fill(g, 1.0).unwrap();
            be.fill(b, 0.0).unwrap();
            be.group_norm_forward(s, x, g, b, y, m, rs, false).unwrap();
            let ys = be.slice(y).unwrap();
            for n in 0..2 {
                for grp in 0..3 {
                    let vals: Vec<f64> = (0..7)
                        .flat_map(|p| (0..2).map(move |cc| (p, grp * 2 + cc)))
                        .map(|(p, ch)| ys[(n * 7 + p) * 6 + ch])
                        .collect();
                    let mean = vals.iter().sum::<f64>() / 14.0;
                    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 14.0;
                    assert!(
                        mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-5,
                        "mean {mean} var {var}"
                    );
                }
            }
        }
    }
}

#[test]
fn linear_silu_and_bias_gradients() {
    let (m, k, n) = (3, 5, 7);
    let mut be = Be::new();
    let mut rnd = Rand(3);
    let (x, w, b, y, r) = (
        alloc(&mut be, m * k),
        alloc(&mut be, n * k),
        alloc(&mut be, n),
        alloc(&mut be, m * n),
        alloc(&mut be, m * n),
    );
    let (dx, dw, db) = (
        alloc(&mut be, m * k),
        alloc(&mut be, n * k),
        alloc(&mut be, n),
    );
    for t in [x, w, b, r] {
        rnd.fill(&mut be, t, 1.0);
    }
    check(
        &mut be,
        "linear",
        &[x, w, b],
        &[dx, dw, db],
        y,
        r,
        &|be| be.linear_forward(m, k, n, x, w, b, y).unwrap(),
        &|be| {
            be.linear_backward(m, k, n, x, w, r, Some(dx), dw, db, false)
                .unwrap()
        },
    );
    let (sy, sdx) = (alloc(&mut be, m * k), alloc(&mut be, m * k));
    let rr = alloc(&mut be, m * k);
    rnd.fill(&mut be, rr, 1.0);
    check(
        &mut be,
        "silu",
        &[x],
        &[sdx],
        sy,
        rr,
        &|be| be.silu_forward(x, sy).unwrap(),
        &|be| be.silu_backward(x, rr, sdx, false).unwrap(),
    );
    // Per-image channel bias (the time-embedding add), applied in place to a copy of x.
    let (imgs, hw, c) = (2, 3, 5);
    let (base, bias, yb, rb, dbias) = (
        alloc(&mut be, imgs * hw * c),
        alloc(&mut be, imgs * c),
        alloc(&mut be, imgs * hw * c),
        alloc(&mut be, imgs * hw * c),
        alloc(&mut be, imgs * c),
    );
    for t in [base, bias, rb] {
        rnd.fill(&mut be, t, 1.0);
    }
    check(
        &mut be,
        "image bias",
        &[bias],
        &[dbias],
        yb,
        rb,
        &|be| {
            be.copy(base, yb).unwrap();
            be.add_image_bias(imgs, hw, c, yb, bias).unwrap();
        },
        &|be| be.image_bias_backward(imgs, hw, c, rb, dbias).unwrap(),
    );
}

#[test]
fn attention_gradients_and_definition() {
    let s = AttentionShape { n: 2, l: 7, c: 5 };
    let mut be = Be::new();
    let mut rnd = Rand(4);
    let (qkv, out, lse, r, dqkv) = (
        alloc(&mut be, 2 * 7 * 15),
        alloc(&mut be, 2 * 7 * 5),
        alloc(&mut be, 14),
        alloc(&mut be, 70),
        alloc(&mut be, 210),
    );
    rnd.fill(&mut be, qkv, 1.0);
    rnd.fill(&mut be, r, 1.0);
    check(
        &mut be,
        "attention",
        &[qkv],
        &[dqkv],
        out,
        r,
        &|be| be.attention_forward(s, qkv, out, lse).unwrap(),
        &|be| be.attention_backward(s, qkv, out, lse, r, dqkv).unwrap(),
    );
    // Definition: out_i = sum_j softmax_j(q_i . k_j / sqrt(c)) v_j; lse_i = log sum_j exp(q_i . k_j / sqrt(c)).
    be.attention_forward(s, qkv, out, lse).unwrap();
    let (x, o, l) = (
        be.slice(qkv).unwrap(),
        be.slice(out).unwrap(),
        be.slice(lse).unwrap(),
    );
    for n in 0..2 {
        for i in 0..7 {
            let row = |p: usize| &x[(n * 7 + p) * 15..(n * 7 + p + 1) * 15];
            let scores: Vec<f64> = (0..7)
                .map(|j| (0..5).map(|c| row(i)[c] * row(j)[5 + c]).sum::<f64>() / 5f64.sqrt())
                .collect();
            let z: f64 = scores.iter().map(|s| s.exp()).sum();
            assert!((l[n * 7 + i] - z.ln()).abs() < 1e-12);
            for c in 0..5 {
                let want: f64 = (0..7).map(|j| scores[j].exp() / z * row(j)[10 + c]).sum();
                assert!((o[(n * 7 + i) * 5 + c] - want).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn upsample_concat_dropout_gradients() {
    let mut be = Be::new();
    let mut rnd = Rand(5);
    let (n, h, w, c) = (2, 3, 2, 3);
    let len = n * h * w * c;
    let (x, y, r, dx) = (
        alloc(&mut be, len),
        alloc(&mut be, 4 * len),
        alloc(&mut be, 4 * len),
        alloc(&mut be, len),
    );
    rnd.fill(&mut be, x, 1.0);
    rnd.fill(&mut be, r, 1.0);
    check(
        &mut be,
        "upsample",
        &[x],
        &[dx],
        y,
        r,
        &|be| be.upsample2x_forward(n, h, w, c, x, y).unwrap(),
        &|be| be.upsample2x_backward(n, h, w, c, r, dx, false).unwrap(),
    );
    // Definition: y[n, i, j] = x[n, i / 2, j / 2].
    be.upsample2x_forward(n, h, w, c, x, y).unwrap();
    let (xs, ys) = (be.slice(x).unwrap(), be.slice(y).unwrap());
    assert_eq!(
        ys[((2 * h + 5) * 2 * w + 3) * c + 2],
        xs[((h + 2) * w + 1) * c + 2]
    );

    let (p, ca, cb) = (6, 3, 5);
    let (a, b, cat, rc, da, db) = (
        alloc(&mut be, p * ca),
        alloc(&mut be, p * cb),
        alloc(&mut be, p * 8),
        alloc(&mut be, p * 8),
        alloc(&mut be, p * ca),
        alloc(&mut be, p * cb),
    );
    for t in [a, b, rc] {
        rnd.fill(&mut be, t, 1.0);
    }
    check(
        &mut be,
        "concat",
        &[a, b],
        &[da, db],
        cat,
        rc,
        &|be| be.concat_forward(p, ca, cb, a, b, cat).unwrap(),
        &|be| {
            be.concat_backward(p, ca, cb, rc, da, db, false, false)
                .unwrap()
        },
    );

    let (dy_, dd) = (alloc(&mut be, len), alloc(&mut be, len));
    let rd = alloc(&mut be, len);
    rnd.fill(&mut be, rd, 1.0);
    check(
        &mut be,
        "dropout",
        &[x],
        &[dd],
        dy_,
        rd,
        &|be| {
            be.dropout_forward(x, dy_, 0.3, 11, Stream::fixed(12))
                .unwrap()
        },
        &|be| {
            be.dropout_backward(rd, dd, 0.3, 11, Stream::fixed(12), false)
                .unwrap()
        },
    );
    // Inverted dropout: each output is 0 or x / (1 - p), and about p of them are 0.
    let big = 20_000;
    let (bx, by) = (alloc(&mut be, big), alloc(&mut be, big));
    be.fill(bx, 1.0).unwrap();
    be.dropout_forward(bx, by, 0.3, 1, Stream::fixed(2))
        .unwrap();
    let ys = be.slice(by).unwrap();
    let zeros = ys.iter().filter(|&&v| v == 0.0).count();
    let kept = 1.0 / (1.0 - f64::from(0.3f32));
    assert!(ys.iter().all(|&v| v == 0.0 || (v - kept).abs() < 1e-12));
    // Binomial(20000, 0.3): sd = 65; 5 sd = 325.
    assert!((zeros as i64 - 6000).abs() < 325, "{zeros} dropped");
}

/// `accumulate = true` adds to what is there; `false` overwrites it.
#[test]
fn accumulate_flag_adds_instead_of_overwriting() {
    let s = ConvShape {
        n: 2,
        h: 4,
        w: 5,
        c: 3,
        o: 2,
        kind: ConvKind::K3S1,
    };
    let mut be = Be::new();
    let mut rnd = Rand(6);
    let (dy, w, dx, pre) = (
        alloc(&mut be, s.y_len()),
        alloc(&mut be, s.w_len()),
        alloc(&mut be, s.x_len()),
        alloc(&mut be, s.x_len()),
    );
    for t in [dy, w, pre] {
        rnd.fill(&mut be, t, 1.0);
    }
    be.conv2d_backward_data(s, dy, w, dx, false).unwrap();
    let fresh = be.slice(dx).unwrap().to_vec();
    be.copy(pre, dx).unwrap();
    be.conv2d_backward_data(s, dy, w, dx, true).unwrap();
    let (acc, p) = (be.slice(dx).unwrap(), be.slice(pre).unwrap());
    for i in 0..fresh.len() {
        assert!((acc[i] - (p[i] + fresh[i])).abs() < 1e-12);
    }
}

#[test]
fn mse_loss_and_timestep_embedding_follow_their_definitions() {
    let mut be = Be::new();
    let (p, t, l, d) = (
        alloc(&mut be, 4),
        alloc(&mut be, 4),
        alloc(&mut be, 1),
        alloc(&mut be, 4),
    );
    be.upload(p, &[1.0, 2.0, -1.0, 0.5]).unwrap();
    be.upload(t, &[0.0, 2.5, 1.0, 0.5]).unwrap();
    be.mse_loss(p, t, l, d).unwrap();
    // (1 + 0.25 + 4 + 0) / 4 and 2 (p - t) / 4.
    assert_eq!(be.slice(l).unwrap(), &[1.3125]);
    assert_eq!(be.slice(d).unwrap(), &[0.5, -0.25, -1.0, 0.0]);

    let (ts, e) = (alloc(&mut be, 2), alloc(&mut be, 16));
    be.upload(ts, &[0.0, 500.0]).unwrap();
    be.timestep_embedding(2, 8, ts, e).unwrap();
    let emb = be.slice(e).unwrap();
    // t = 0: sin 0 = 0, cos 0 = 1. t = 500, dim 8: frequencies 10000^(-i/3), i = 0..3.
    assert_eq!(&emb[..8], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    for i in 0..4 {
        let f = 10000f64.powf(-(i as f64) / 3.0);
        assert!((emb[8 + i] - (500.0 * f).sin()).abs() < 1e-12);
        assert!((emb[12 + i] - (500.0 * f).cos()).abs() < 1e-12);
    }
}

/// The small two-level model with attention of the whole-network checks.
fn small_unet_config(classes: Option<ddpm_cuda::model::Classes>) -> ddpm_cuda::model::UNetConfig {
    ddpm_cuda::model::UNetConfig {
        classes,
        ..common::two_level(4, [4, 6], 1, 2, 0.25)
    }
}

/// The whole U-Net against finite differences in its parameters: a loss `sum(r * eps_hat)`, dropout on,
/// timesteps far apart, `labels` where the model has classes. Checks three coordinates of every
/// parameter tensor, and every coordinate of those whose name is `every`. Returns how many it checked.
fn unet_finite_differences(
    cfg: &ddpm_cuda::model::UNetConfig,
    timesteps: &[f32],
    labels: Option<&[usize]>,
    every: &str,
) -> usize {
    use ddpm_cuda::model::UNet;
    let mut be = Be::new();
    let mut net = UNet::new(&mut be, cfg, timesteps.len()).unwrap();
    let mut rnd = Rand(40);
    // Random parameters on a scale where every path matters (the paper's init zeroes some layers).
    rnd.fill(&mut be, net.params, 0.4);
    rnd.fill(&mut be, net.input, 1.0);
    be.upload(net.timesteps, timesteps).unwrap();
    if let Some(l) = labels {
        net.set_labels(&mut be, l).unwrap();
    }
    let out = net.output();
    let r = be.alloc(out.len).unwrap();
    rnd.fill(&mut be, r, 1.0);
    // Dropout with seed 3, at training step 8.
    be.clock_set(8).unwrap();
    let key = Some(3u64);
    net.forward(&mut be, key).unwrap();
    be.copy(r, net.output_grad()).unwrap();
    net.backward(&mut be).unwrap();
    let ana = be.slice(net.grads).unwrap().to_vec();
    let h = 1e-5;
    let mut checked = 0;
    for spec in net.specs().to_vec() {
        let coords: Vec<usize> = if spec.name == every {
            (0..spec.len).collect()
        } else {
            vec![0, spec.len / 2, spec.len - 1]
        };
        for i in coords {
            let e = spec.offset + i;
            let orig = be.slice(net.params).unwrap()[e];
            let mut l = [0.0; 2];
            for (k, d) in [h, -h].into_iter().enumerate() {
                be.slice_mut(net.params).unwrap()[e] = orig + d;
                net.forward(&mut be, key).unwrap();
                l[k] = dot(&be, out, r);
            }
            be.slice_mut(net.params).unwrap()[e] = orig;
            let num = (l[0] - l[1]) / (2.0 * h);
            // f64 central differences with h = 1e-5: truncation ~h^2 times the third derivative, ~1e-9.
            assert!(
                (num - ana[e]).abs() <= 1e-7 + 1e-6 * ana[e].abs(),
                "{}[{i}]: finite difference {num}, backward {}",
                spec.name,
                ana[e]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn unet_parameter_gradients_with_dropout() {
    let checked = unet_finite_differences(&small_unet_config(None), &[5.0, 900.0], None, "");
    assert!(checked > 100);
}

/// The class-conditional model: every coordinate of the embedding table, whose rows are two real classes
/// and the null class. Two of the three images share class 1, so their gradients add; class 0 is absent,
/// so its row's gradient must be exactly what the differences say, zero.
#[test]
fn conditional_unet_gradients_cover_every_embedding_row() {
    let classes = ddpm_cuda::model::Classes::with_null(2, None);
    let cfg = small_unet_config(Some(classes));
    let checked = unet_finite_differences(
        &cfg,
        &[5.0, 300.0, 900.0],
        Some(&[1, 2, 1]),
        "class_embedding.weight",
    );
    // 3 rows of the time embedding's width (16) in full, three coordinates of the others.
    assert!(checked > 100 + 3 * 16);
}
