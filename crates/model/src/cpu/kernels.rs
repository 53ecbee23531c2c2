//! Plain f32 kernels of the CPU reference. Dot products keep eight partial sums so the compiler can vectorise
//! them; results therefore differ from a sequential sum only in f32 rounding.

/// `Σ a[i]·b[i]`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// `y[r] += s · x[r]`.
#[inline]
pub fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += s * xi;
    }
}

/// `y = x·Wᵀ`: `x: [rows, k]`, `w: [n, k]` row-major → `[rows, n]`.
pub fn matmul_t(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * n];
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        let yr = &mut y[r * n..(r + 1) * n];
        for (j, yj) in yr.iter_mut().enumerate() {
            *yj = dot(xr, &w[j * k..(j + 1) * k]);
        }
    }
    y
}

/// RMSNorm of one row: `w ⊙ x / sqrt(mean(x²) + eps)`.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, xi), wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * inv);
    }
}

/// LayerNorm of one row with bias (biased variance, as torch).
pub fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, xi), wi), bi) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (xi - mean) * inv * wi + bi;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Softmax in place (max-subtracted).
pub fn softmax(v: &mut [f32]) {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k(v: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_matmul_agree_with_naive_sums() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..19).map(|i| (i as f32).sin()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-5);
        // [2, 3] · [[1,0,0],[0,2,0]]ᵀ
        let y = matmul_t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3, &[1.0, 0.0, 0.0, 0.0, 2.0, 0.0], 2);
        assert_eq!(y, vec![1.0, 4.0, 4.0, 10.0]);
    }

    #[test]
    fn top_k_orders_and_breaks_ties_low() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 3), vec![1, 3, 2]);
    }

    #[test]
    fn norms() {
        let mut out = [0f32; 2];
        rms_norm_row(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let inv = 1.0 / (12.5f32).sqrt();
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6);
        layer_norm_row(&[1.0, 3.0], &[1.0, 1.0], &[0.5, 0.5], 0.0, &mut out);
        assert!((out[0] + 0.5).abs() < 1e-6 && (out[1] - 1.5).abs() < 1e-6);
    }
}
