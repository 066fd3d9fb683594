//! LoRA inside the fused encoder: the packed adapters of a pass, and each layer's view of them (forward
//! update and backward gradients).

use std::ops::Range;

use super::*;
use crate::cpu::gemm::{matmul, Threads, View, ViewMut};
use crate::cpu::math::{self, simd};

/// The projections LoRA can sit on, in this order: query, key, value, attention output, intermediate, output.
pub const SITES: usize = 6;

/// LoRA on the fused pass; see the module docs. The adapters' matrices are the op's second input, packed:
/// layer by layer, site by site (where `sites` says), for each packed adapter its `A` (`r × in`) then its `B`
/// (`out × r`). candle then hands each matrix its part of the packed gradient. Only the adapters of the batch's
/// routes are packed: the others must get no gradient, not even a zero one (AdamW would count it as a step).
#[derive(Debug)]
pub struct FusedLora {
    /// `alpha / r`.
    pub scale: f32,
    pub r: usize,
    /// Per layer, which sites carry LoRA.
    pub sites: Vec<[bool; SITES]>,
    /// Token rows of each route, in order and covering every row, and the packed adapter they go through.
    pub routes: Vec<(Range<usize>, usize)>,
    /// How many adapters are packed.
    pub adapters: usize,
    /// In training with LoRA dropout: per layer and site, the dropout of the site's input, as seeds (the
    /// multipliers are drawn where they are used, forward and backward, not kept between the passes).
    pub dropout: Option<Vec<[Option<SiteDropout>; SITES]>>,
}

/// LoRA's dropout on one site's input: its rate and one seed per route, in the order of
/// [`FusedLora::routes`]; a route's rows take the mask of its seed ([`math::fill_mask`]), as the composed path
/// draws it from the same seeds.
#[derive(Debug, Clone)]
pub struct SiteDropout {
    pub p: f32,
    pub seeds: Vec<u64>,
}

/// Inputs and outputs of a LoRA site.
pub(super) fn site_dims(d: &Dims, site: usize) -> (usize, usize) {
    match site {
        4 => (d.hidden, d.intermediate),
        5 => (d.intermediate, d.hidden),
        _ => (d.hidden, d.hidden),
    }
}

impl FusedLora {
    /// Where each layer's sites start in the packed input, and its length.
    pub(super) fn offsets(&self, d: &Dims) -> (Vec<[Option<usize>; SITES]>, usize) {
        let mut at = 0;
        let offsets = self
            .sites
            .iter()
            .map(|sites| {
                std::array::from_fn(|m| {
                    sites[m].then(|| {
                        let (i, o) = site_dims(d, m);
                        let start = at;
                        at += self.adapters * self.r * (i + o);
                        start
                    })
                })
            })
            .collect();
        (offsets, at)
    }

    pub(super) fn check(&self, d: &Dims, layers: usize, packed: usize) -> candle_core::Result<()> {
        let mut next = 0;
        for (rows, adapter) in &self.routes {
            if rows.start != next || *adapter >= self.adapters {
                candle_core::bail!("fused encoder: LoRA routes {:?} do not cover the rows in order", self.routes)
            }
            next = rows.end;
        }
        if next != d.tokens() || self.sites.len() != layers || self.offsets(d).1 != packed {
            candle_core::bail!("fused encoder: LoRA routes, sites or packed adapters do not match {d:?}")
        }
        if let Some(dropout) = &self.dropout {
            let fits = |l: &[Option<SiteDropout>; SITES]| {
                l.iter().flatten().all(|s| s.seeds.len() == self.routes.len() && (0.0..1.0).contains(&s.p))
            };
            if dropout.len() != layers || !dropout.iter().all(fits) {
                candle_core::bail!("fused encoder: LoRA dropout does not match the layers and routes")
            }
        }
        Ok(())
    }
}

/// One layer's view of the LoRA of a pass.
pub(super) struct LayerLora<'a> {
    pub(super) lora: &'a FusedLora,
    pub(super) packed: &'a [f32],
    pub(super) offsets: [Option<usize>; SITES],
    pub(super) dropout: Option<&'a [Option<SiteDropout>; SITES]>,
}

impl LayerLora<'_> {
    /// Where adapter `u`'s `A` and `B` of `site` start in the packed input.
    fn pair(&self, d: &Dims, site: usize, u: usize) -> Option<(usize, usize)> {
        let (i, o) = site_dims(d, site);
        let a = self.offsets[site]? + u * self.lora.r * (i + o);
        Some((a, a + self.lora.r * i))
    }

    /// The site's dropout rate, and each route's element range of the site's input (`tokens × in`) with the
    /// seed of its mask; `None` without dropout.
    fn route_masks(&self, d: &Dims, site: usize) -> Option<(f32, impl Iterator<Item = (Range<usize>, u64)> + '_)> {
        let dropout = self.dropout.and_then(|m| m[site].as_ref())?;
        let i = site_dims(d, site).0;
        let ranges = self.lora.routes.iter().map(move |(rows, _)| rows.start * i..rows.end * i);
        Some((dropout.p, ranges.zip(dropout.seeds.iter().copied())))
    }

    /// The site's input after its dropout (in a pooled buffer: [`recycle`] it), each route's mask drawn from
    /// its seed chunk by chunk as it is applied; `x` itself (no copy) without dropout.
    fn dropped<'x>(&self, d: &Dims, site: usize, x: &'x [f32]) -> std::borrow::Cow<'x, [f32]> {
        let Some((p, routes)) = self.route_masks(d, site) else { return std::borrow::Cow::Borrowed(x) };
        let mut out = pool::take(x.len());
        for (range, seed) in routes {
            math::fill_dropped(seed, p, &x[range.clone()], &mut out[range]);
        }
        std::borrow::Cow::Owned(out)
    }

    /// The site's dropout multipliers (`tokens × in`, in a pooled buffer), drawn from the routes' seeds.
    fn mask(&self, d: &Dims, site: usize) -> Option<Vec<f32>> {
        let (p, routes) = self.route_masks(d, site)?;
        let mut mask = pool::take(d.tokens() * site_dims(d, site).0);
        for (range, seed) in routes {
            math::fill_mask(seed, p, &mut mask[range]);
        }
        Some(mask)
    }

    /// Adds `scale · drop(x) Aᵀ Bᵀ` to the site's output (`tokens × out` at column `offset` of rows of
    /// `stride`); returns `drop(x) Aᵀ` for the backward pass, or nothing where the site has no LoRA.
    pub(super) fn forward(
        &self,
        d: &Dims,
        site: usize,
        x: &[f32],
        out: &mut [f32],
        stride: usize,
        offset: usize,
    ) -> Option<Vec<f32>> {
        self.offsets[site]?;
        let ((i, o), r) = (site_dims(d, site), self.lora.r);
        let xd = self.dropped(d, site, x);
        let mut h = vec![0f32; d.tokens() * r];
        for (rows, u) in &self.lora.routes {
            let ((a, b), len) = (self.pair(d, site, *u)?, rows.len());
            let hr = &mut h[rows.start * r..rows.end * r];
            matmul(
                ViewMut::new(hr, len, r),
                View::new(&xd[rows.start * i..rows.end * i], len, i),
                View::new(&self.packed[a..a + r * i], r, i).t(),
                1.0,
                false,
                Threads::All,
            );
            let dst = ViewMut::strided(&mut out[rows.start * stride + offset..], len, o, stride);
            matmul(
                dst,
                View::new(hr, len, r),
                View::new(&self.packed[b..b + o * r], o, r).t(),
                self.lora.scale,
                true,
                Threads::All,
            );
        }
        recycle(xd);
        Some(h)
    }

    /// The backward pass of the site's update, given the gradient of its output (`dout`, laid out as
    /// [`LayerLora::forward`]'s `out`): adds the adapters' gradients into `g` (packed as the input) and the
    /// input's gradient into `dx`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        d: &Dims,
        site: usize,
        x: &[f32],
        h: &[f32],
        dout: &[f32],
        stride: usize,
        offset: usize,
        dx: &mut [f32],
        g: &mut [f32],
    ) {
        let ((i, o), r, scale) = (site_dims(d, site), self.lora.r, self.lora.scale);
        // The mask drawn again from its seeds (the forward pass kept none), once for both of its uses.
        let mask = self.mask(d, site);
        let xd = masked(x, mask.as_deref().map(DropoutMask::Values));
        for (rows, u) in &self.lora.routes {
            let (Some((a, b)), len) = (self.pair(d, site, *u), rows.len()) else { break };
            let dout = View::strided(&dout[rows.start * stride + offset..], len, o, stride);
            let hr = View::new(&h[rows.start * r..rows.end * r], len, r);
            // dB += scale · doutᵀ h;  dh = scale · dout B;  dA += dhᵀ drop(x);  dx += (dh A) ∘ mask.
            matmul(ViewMut::new(&mut g[b..b + o * r], o, r), dout.t(), hr, scale, true, Threads::All);
            let mut dh = vec![0f32; len * r];
            matmul(
                ViewMut::new(&mut dh, len, r),
                dout,
                View::new(&self.packed[b..b + o * r], o, r),
                scale,
                false,
                Threads::All,
            );
            let dh = View::new(&dh, len, r);
            matmul(
                ViewMut::new(&mut g[a..a + r * i], r, i),
                dh.t(),
                View::new(&xd[rows.start * i..rows.end * i], len, i),
                1.0,
                true,
                Threads::All,
            );
            let (dxr, a) = (&mut dx[rows.start * i..rows.end * i], View::new(&self.packed[a..a + r * i], r, i));
            match mask.as_deref() {
                None => matmul(ViewMut::new(dxr, len, i), dh, a, 1.0, true, Threads::All),
                Some(m) => {
                    // Overwritten whole by the product.
                    let mut dxd = pool::take(len * i);
                    matmul(ViewMut::new(&mut dxd, len, i), dh, a, 1.0, false, Threads::All);
                    let m = &m[rows.start * i..rows.end * i];
                    simd(
                        #[inline(always)]
                        || {
                            for ((dx, v), m) in dxr.iter_mut().zip(&dxd).zip(m) {
                                *dx += v * m;
                            }
                        },
                    );
                    pool::give(dxd);
                }
            }
        }
        recycle(xd);
        if let Some(mask) = mask {
            pool::give(mask);
        }
    }
}
