//! RoPE frequencies with YaRN scaling, computed as HF transformers' `_compute_yarn_parameters` does
//! (`modeling_rope_utils.py`; MODEL_SPEC §2.4), in f32 like HF so angles agree to the last bit that matters.
//! With DeepSeek's `mscale == mscale_all_dim` the cos/sin attention factor is 1, so only frequencies change;
//! the softmax rescaling lives in [`crate::ModelConfig::softmax_scale`].

use crate::config::Rope;

/// One inverse frequency per rotated pair of a `dim`-wide rope slice.
pub fn inv_freq(rope: &Rope, dim: usize) -> Vec<f32> {
    let base = rope.theta as f32;
    let half = dim / 2;
    // HF: pos_freqs = base ** (arange(0, dim, 2) / dim), in f32.
    let pos_freqs: Vec<f32> = (0..half).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect();
    let Some(y) = &rope.yarn else {
        return pos_freqs.iter().map(|p| 1.0 / p).collect();
    };
    let factor = y.factor as f32;
    let correction_dim = |rotations: f64| {
        (dim as f64 * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln())
            / (2.0 * (rope.theta).ln())
    };
    // truncate = true (HF's default): floor / ceil, then clamp into [0, dim-1].
    let low = correction_dim(y.beta_fast).floor().max(0.0) as f32;
    let mut high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0) as f32;
    if low == high {
        high += 0.001; // HF's guard against a zero-width ramp
    }
    pos_freqs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let inter = 1.0 / (factor * p);
            let extra = 1.0 / p;
            inter * (1.0 - extrapolation) + extra * extrapolation
        })
        .collect()
}

/// Rotates one pair by the angle `pos · f`, with the angle and its cos/sin in f32 as HF computes them.
#[inline]
pub fn rotate(a: f32, b: f32, pos: usize, f: f32) -> (f32, f32) {
    let theta = pos as f32 * f;
    let (s, c) = theta.sin_cos();
    (a * c - b * s, b * c + a * s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Yarn;

    fn v3_rope() -> Rope {
        Rope {
            theta: 10000.0,
            yarn: Some(Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
            }),
        }
    }

    /// MODEL_SPEC §2.4: with DeepSeek-V3's numbers the ramp runs from pair 10 to pair 23: pairs up to 10 keep
    /// their frequency, pairs from 23 on are divided by the factor 40.
    #[test]
    fn yarn_ramp_matches_the_spec() {
        let f = inv_freq(&v3_rope(), 64);
        let plain = inv_freq(&Rope { theta: 10000.0, yarn: None }, 64);
        assert_eq!(f.len(), 32);
        for i in 0..=10 {
            assert!((f[i] - plain[i]).abs() <= 1e-7 * plain[i], "pair {i}");
        }
        for i in 23..32 {
            assert!((f[i] - plain[i] / 40.0).abs() <= 1e-6 * plain[i], "pair {i}");
        }
        assert!(f[16] < plain[16] && f[16] > plain[16] / 40.0);
    }

    #[test]
    fn rotation_preserves_norm() {
        let (a, b) = rotate(0.3, -1.2, 17, 0.25);
        assert!(((a * a + b * b) - (0.09 + 1.44)).abs() < 1e-5);
    }
}
