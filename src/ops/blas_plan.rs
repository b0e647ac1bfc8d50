//! How a row-major product C [M, N] = A [M, K] · B [K, N] of 2-D strided views is handed to a
//! column-major BLAS (cuBLAS, cuBLASLt; `ops::cublas`): pure arithmetic on shapes and strides,
//! kept out of the CUDA module so that the CPU test suite checks it against a column-major GEMM
//! written out below.
//!
//! cuBLAS computes op(A) [m, k] · op(B) [k, n] → C [m, n], each matrix stored column-major with a
//! leading dimension. A row-major C [M, N] is the column-major Cᵀ [N, M], and Cᵀ = Bᵀ · Aᵀ: so
//! cuBLAS's A is our B read as Bᵀ [N, K], its B our A read as Aᵀ [K, M], and ldc = N.

/// cuBLAS's view of one product (column-major; `ta`/`tb`: the stored matrix is transposed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlasPlan {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl BlasPlan {
    /// The stored (column-major) shapes of A and B, (rows, cols), as cuBLASLt's matrix layouts
    /// describe them: op(A) is [m, k] and op(B) [k, n], so a transposed operand is stored
    /// [k, m] or [n, k]. Each leading dimension covers its stored rows.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn stored(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.ta { (self.k, self.m) } else { (self.m, self.k) };
        let b = if self.tb { (self.n, self.k) } else { (self.k, self.n) };
        (a, b)
    }
}

/// The plan for `a [M, K] · b [K, N]` with strides `sa`, `sb` (row, column; elements), or `None`
/// where cuBLAS cannot read an operand as stored (no unit stride, a row stride shorter than the
/// row) or a size does not fit its 32-bit ints.
pub(crate) fn plan((m, n, k): (usize, usize, usize), sa: [usize; 2], sb: [usize; 2]) -> Option<BlasPlan> {
    if [m, n, k].iter().any(|&d| d == 0 || d > i32::MAX as usize) {
        return None;
    }
    let (ta, lda) = col_major(k, n, sb[0], sb[1])?;
    let (tb, ldb) = col_major(m, k, sa[0], sa[1])?;
    if lda > i32::MAX as usize || ldb > i32::MAX as usize {
        return None;
    }
    Some(BlasPlan { ta, tb, m: n, n: m, k, lda, ldb, ldc: n })
}

/// How cuBLAS reads a matrix X [rows, cols] (element (r, c) at r·s_row + c·s_col from its
/// start) as the column-major operand whose op is Xᵀ [cols, rows]: (transpose, leading
/// dimension). Untransposed when X's rows are unit-stride runs (Xᵀ stored column-major with
/// ld = s_row), transposed when its columns are (X itself stored column-major, ld = s_col);
/// a dimension of 1 takes any stride. `None` for anything else.
fn col_major(rows: usize, cols: usize, s_row: usize, s_col: usize) -> Option<(bool, usize)> {
    if s_col == 1 || cols == 1 {
        let ld = if rows == 1 { cols } else { s_row };
        if ld >= cols.max(1) {
            return Some((false, ld));
        }
    }
    if s_row == 1 || rows == 1 {
        let ld = if cols == 1 { rows } else { s_col };
        if ld >= rows.max(1) {
            return Some((true, ld));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// cuBLAS's GEMM as its documentation defines it: C (col-major, ldc) = op(A) · op(B), A and
    /// B read column-major through their leading dimensions from the given offsets.
    fn blas_gemm(p: &BlasPlan, a: (&[f64], usize), b: (&[f64], usize)) -> Vec<f64> {
        let at = |i: usize, l: usize| if p.ta { a.0[a.1 + l + i * p.lda] } else { a.0[a.1 + i + l * p.lda] };
        let bt = |l: usize, j: usize| if p.tb { b.0[b.1 + j + l * p.ldb] } else { b.0[b.1 + l + j * p.ldb] };
        let mut c = vec![0.0; p.ldc * p.n];
        for j in 0..p.n {
            for i in 0..p.m {
                c[i + j * p.ldc] = (0..p.k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    /// A [rows, cols] view of its own buffer: `transposed` stores it column by column; `pad`
    /// elements end every stored line; `offset` elements precede it. Unread slots are NaN, so a
    /// read outside the view poisons the product.
    fn view(
        rows: usize,
        cols: usize,
        transposed: bool,
        pad: usize,
        offset: usize,
        seed: u64,
    ) -> (Vec<f64>, [usize; 2], usize) {
        let strides = if transposed { [1, rows + pad] } else { [cols + pad, 1] };
        let len = offset + (rows - 1) * strides[0] + (cols - 1) * strides[1] + 1 + 3;
        let mut buf = vec![f64::NAN; len];
        let mut s = seed;
        for r in 0..rows {
            for c in 0..cols {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                buf[offset + r * strides[0] + c * strides[1]] = ((s >> 40) % 7) as f64 - 3.0;
            }
        }
        (buf, strides, offset)
    }

    proptest! {
        /// Any shape (1 row or column included) with either operand row- or column-major, rows
        /// padded and offset: the plan fed to the BLAS definition gives the row-major product.
        #[test]
        fn the_plan_computes_the_row_major_product(
            m in 1usize..9, n in 1usize..9, k in 1usize..9,
            a_t: bool, b_t: bool, pads in (0usize..3, 0usize..3), offsets in (0usize..4, 0usize..4), seed: u64,
        ) {
            let (a, sa, oa) = view(m, k, a_t, pads.0, offsets.0, seed);
            let (b, sb, ob) = view(k, n, b_t, pads.1, offsets.1, seed ^ 0x5555);
            let p = plan((m, n, k), sa, sb).expect("unit-stride views are readable");
            let c = blas_gemm(&p, (&b, ob), (&a, oa)); // cuBLAS's A is our B
            // cuBLASLt's layouts: the stored shapes, every leading dimension covering its rows.
            let ((ar, ac), (br, bc)) = p.stored();
            prop_assert_eq!((ar * ac, br * bc), (p.m * p.k, p.k * p.n));
            prop_assert!(p.lda >= ar && p.ldb >= br && p.ldc >= p.m, "{:?}", p);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| a[oa + i * sa[0] + l * sa[1]] * b[ob + l * sb[0] + j * sb[1]]).sum();
                    prop_assert_eq!(c[j + i * p.ldc], want, "C[{}][{}] of {:?}", i, j, p);
                }
            }
        }
    }

    #[test]
    fn operands_are_read_as_stored() {
        // a row-major [4, 6] matrix, rows 6 apart: Xᵀ untransposed, ld 6
        assert_eq!(col_major(4, 6, 6, 1), Some((false, 6)));
        // rows of a wider buffer (a view into a fused output): ld is the row stride
        assert_eq!(col_major(4, 6, 10, 1), Some((false, 10)));
        // Wᵀ of a row-major W [6, 4]: X [4, 6] with columns 4 apart, transposed, ld 4
        assert_eq!(col_major(4, 6, 1, 4), Some((true, 4)));
        // one row or one column takes any stride
        assert_eq!(col_major(1, 6, 999, 1), Some((false, 6)));
        assert_eq!(col_major(4, 1, 1, 999), Some((false, 1)));
        // a row stride shorter than the row, or no unit stride: not readable
        assert_eq!(col_major(4, 6, 3, 1), None);
        assert_eq!(col_major(4, 6, 12, 2), None);
        assert_eq!(plan((4, 6, 5), [12, 2], [6, 1]), None);
        assert_eq!(plan((0, 6, 5), [5, 1], [6, 1]), None);
    }
}
