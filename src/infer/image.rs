//! CLIP image preprocessing, bit-compatible with HF `CLIPImageProcessor` (which resizes with PIL).
//!
//! The vision tower was trained on PIL's output, so "close" is not the target: the resampler
//! below is PIL's `ImagingResample` (Pillow `src/libImaging/Resample.c`) re-derived step by step —
//! separable convolution, horizontal pass first, coefficients computed in f64, normalised per
//! output pixel, then rounded to 22-bit fixed point; each pass accumulates in integers starting
//! at ½ and clips to u8, so the intermediate image after the horizontal pass is u8 as in PIL.
//! Rescale and normalise then follow numpy's dtype rules in transformers (`u8 → f64 · factor →
//! f32`, then `(x − mean) / std` in f32), so PNG inputs match the reference to the last bit.
//!
//! Pipeline (formats.md §9.4): load → RGB the way PIL's `convert("RGB")` does → [`AspectMode`]
//! (`pad`: paste centred on a square of the mean colour) → resize the shortest edge → centre crop
//! → rescale → normalise → `[3, H, W]` f32.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::{Error, Result};

/// OpenAI CLIP normalisation mean (also NeMo's `OPENAI_DATASET_MEAN`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP normalisation std.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// What the image is fitted to before the processor runs (LLaVA `image_aspect_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AspectMode {
    /// The processor directly (shortest-edge resize + centre crop; NeMo's default).
    Square,
    /// LLaVA-1.5: pad to a square of the mean colour first, image centred.
    Pad,
    /// NeMo only: shortest edge `int(min(448 / aspect, 224))`, no centre crop.
    Keep,
}

impl AspectMode {
    /// `square`, `pad` or `keep`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "square" => Ok(AspectMode::Square),
            "pad" => Ok(AspectMode::Pad),
            "keep" => Ok(AspectMode::Keep),
            other => {
                Err(Error::Usage(format!("unknown image_aspect_ratio {other:?}; valid: square, pad, keep")))
            }
        }
    }
}

/// PIL resampling filters (`PILImageResampling` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3 (CLIP's)
    Bicubic,
    /// 4
    Box,
    /// 5
    Hamming,
}

impl Filter {
    /// From the `resample` number of a preprocessor config. Nearest (0) takes a different code
    /// path in PIL and is not implemented.
    pub fn from_pil(code: u64) -> Option<Self> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    /// Half-width of the kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The kernel, written as in Resample.c (operation order included: it decides the last bit
    /// of a coefficient, and a coefficient's last bit can decide a rounded pixel).
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // 0.54f / 0.46f are C float literals.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// The resize target of a preprocessor config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// `{"shortest_edge": n}`: short side to n, long side `int(n · long / short)`.
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`: exactly this size.
    Exact {
        /// Output height.
        height: u32,
        /// Output width.
        width: u32,
    },
}

/// The settings of HF `CLIPImageProcessor` (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// `do_convert_rgb` (loading always produces RGB; kept for completeness).
    pub do_convert_rgb: bool,
    /// `do_resize`.
    pub do_resize: bool,
    /// `size`.
    pub size: ResizeTo,
    /// `resample`.
    pub resample: Filter,
    /// `do_center_crop`.
    pub do_center_crop: bool,
    /// `crop_size` as (height, width).
    pub crop_size: (u32, u32),
    /// `do_rescale`.
    pub do_rescale: bool,
    /// `rescale_factor` (1/255).
    pub rescale_factor: f64,
    /// `do_normalize`.
    pub do_normalize: bool,
    /// `image_mean`.
    pub image_mean: [f64; 3],
    /// `image_std`.
    pub image_std: [f64; 3],
}

impl Default for PreprocessConfig {
    /// `openai/clip-vit-large-patch14-336`, the tower of LLaVA-1.5 and NeVA.
    fn default() -> Self {
        Self::clip_with_size(336)
    }
}

impl PreprocessConfig {
    /// `CLIPImageProcessor` defaults with shortest edge and crop `size` (224 is the class
    /// default, 336 the LLaVA-1.5 tower).
    pub fn clip_with_size(size: u32) -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            size: ResizeTo::ShortestEdge(size),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: (size, size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// `dir/preprocessor_config.json`, or the CLIP-L/14-336 settings when the file is absent.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("preprocessor_config.json");
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// Reads a `preprocessor_config.json`. Missing keys take `CLIPImageProcessor`'s own
    /// defaults (as transformers does), so a bare `{}` means the 224 px processor.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&json, path)
    }

    /// Parses the config JSON; `origin` names it in errors.
    pub fn from_json(json: &serde_json::Value, origin: &Path) -> Result<Self> {
        let bad = |key: &str, why: &str| Error::config(origin, format!("{key}: {why}"));
        if let Some(kind) = json.get("image_processor_type").and_then(|v| v.as_str()) {
            if !matches!(kind, "CLIPImageProcessor" | "CLIPFeatureExtractor") {
                return Err(bad(
                    "image_processor_type",
                    &format!(
                        "{kind} is not supported (only CLIPImageProcessor, whose PIL resize this reproduces)"
                    ),
                ));
            }
        }
        let mut cfg = Self::clip_with_size(224);
        let flag = |key: &str, default: bool| -> Result<bool> {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| bad(key, "expected true or false")),
            }
        };
        cfg.do_convert_rgb = flag("do_convert_rgb", cfg.do_convert_rgb)?;
        cfg.do_resize = flag("do_resize", cfg.do_resize)?;
        cfg.do_center_crop = flag("do_center_crop", cfg.do_center_crop)?;
        cfg.do_rescale = flag("do_rescale", cfg.do_rescale)?;
        cfg.do_normalize = flag("do_normalize", cfg.do_normalize)?;

        let dim = |v: &serde_json::Value, key: &str| -> Result<u32> {
            v.as_u64()
                .filter(|&n| n > 0 && n <= u32::MAX as u64)
                .map(|n| n as u32)
                .ok_or_else(|| bad(key, "expected a positive integer"))
        };
        // `size` and `crop_size` may be ints (old configs) or dicts (transformers ≥ 4.27).
        match json.get("size") {
            None | Some(serde_json::Value::Null) => {}
            Some(v @ serde_json::Value::Number(_)) => cfg.size = ResizeTo::ShortestEdge(dim(v, "size")?),
            Some(v) => {
                cfg.size = if let Some(s) = v.get("shortest_edge") {
                    ResizeTo::ShortestEdge(dim(s, "size.shortest_edge")?)
                } else if let (Some(h), Some(w)) = (v.get("height"), v.get("width")) {
                    ResizeTo::Exact { height: dim(h, "size.height")?, width: dim(w, "size.width")? }
                } else {
                    return Err(bad("size", "expected shortest_edge or height and width"));
                }
            }
        }
        match json.get("crop_size") {
            None | Some(serde_json::Value::Null) => {}
            Some(v @ serde_json::Value::Number(_)) => {
                let n = dim(v, "crop_size")?;
                cfg.crop_size = (n, n);
            }
            Some(v) => {
                let (Some(h), Some(w)) = (v.get("height"), v.get("width")) else {
                    return Err(bad("crop_size", "expected height and width"));
                };
                cfg.crop_size = (dim(h, "crop_size.height")?, dim(w, "crop_size.width")?);
            }
        }
        if let Some(v) = json.get("resample").filter(|v| !v.is_null()) {
            let code = v.as_u64().ok_or_else(|| bad("resample", "expected a PIL filter number"))?;
            cfg.resample = Filter::from_pil(code)
                .ok_or_else(|| bad("resample", &format!("PIL filter {code} is not supported (1–5 are)")))?;
        }
        if let Some(v) = json.get("rescale_factor").filter(|v| !v.is_null()) {
            cfg.rescale_factor = v.as_f64().ok_or_else(|| bad("rescale_factor", "expected a number"))?;
        }
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(serde_json::Value::Number(n)) => {
                    let x = n.as_f64().ok_or_else(|| bad(key, "expected a number"))?;
                    Ok([x; 3])
                }
                Some(v) => {
                    let values: Option<Vec<f64>> =
                        v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect());
                    match values.as_deref() {
                        Some(&[a, b, c]) => Ok([a, b, c]),
                        _ => Err(bad(key, "expected three numbers (R, G, B)")),
                    }
                }
            }
        };
        cfg.image_mean = triple("image_mean", cfg.image_mean)?;
        cfg.image_std = triple("image_std", cfg.image_std)?;
        if cfg.image_std.contains(&0.0) {
            return Err(bad("image_std", "a zero std would divide by zero"));
        }
        Ok(cfg)
    }

    /// Checks that the images this config makes in `mode` are `side`×`side`, what the vision
    /// tower takes (its `image_size`); a mismatch would otherwise surface as a shape error inside
    /// the tower. `origin` names the checkpoint whose `preprocessor_config.json` this is. Sizes
    /// that depend on the image (no crop, resizing the shortest edge of an unpadded image, or
    /// LLaVA's `keep`) are not checked.
    pub fn check_tower_size(&self, side: u32, mode: AspectMode, origin: &Path) -> Result<()> {
        let out = match (mode, self.do_center_crop, self.do_resize, self.size) {
            (AspectMode::Keep, ..) => return Ok(()),
            (_, true, ..) => self.crop_size,
            (AspectMode::Pad, false, true, ResizeTo::ShortestEdge(s)) => (s, s),
            (_, false, true, ResizeTo::Exact { height, width }) => (height, width),
            _ => return Ok(()),
        };
        if out == (side, side) {
            return Ok(());
        }
        Err(Error::config(
            origin,
            format!(
                "preprocessor_config.json makes {}×{} images (its crop_size, or size) but the vision tower takes {side}×{side} (its image_size)",
                out.0, out.1
            ),
        ))
    }

    /// LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)` = (122, 116, 104) for CLIP.
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).trunc().clamp(0.0, 255.0) as u8)
    }

    /// `[3, H, W]` pixel values of an RGB image.
    pub fn preprocess(&self, image: &RgbImage, mode: AspectMode) -> Result<PixelValues> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::Usage("cannot preprocess an empty image".into()));
        }
        let (padded, size, crop) = match mode {
            AspectMode::Square => (None, self.size, self.do_center_crop),
            AspectMode::Pad => {
                (Some(expand_to_square(image, self.pad_color())), self.size, self.do_center_crop)
            }
            AspectMode::Keep => {
                let (w, h) = (image.width() as f64, image.height() as f64);
                let aspect = w.max(h) / w.min(h);
                let edge = (448.0 / aspect).min(224.0).trunc() as u32;
                (None, ResizeTo::ShortestEdge(edge.max(1)), false)
            }
        };
        let mut img = padded.as_ref().unwrap_or(image).clone();
        if self.do_resize {
            let (width, height) = resize_output_size(img.width(), img.height(), size);
            img = resize(&img, width, height, self.resample);
        }
        if crop {
            img = center_crop(&img, self.crop_size.0, self.crop_size.1);
        }
        Ok(self.to_pixel_values(&img))
    }

    /// Rescale and normalise with the reference's dtypes: `f32(f64(u8) · factor)`, then
    /// `(x − f32(mean)) / f32(std)` in f32.
    fn to_pixel_values(&self, img: &RgbImage) -> PixelValues {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let mut data = vec![0f32; 3 * h * w]; // [3, H, W]
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut x =
                    if self.do_rescale { (px[c] as f64 * self.rescale_factor) as f32 } else { px[c] as f32 };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                data[c * h * w + i] = x;
            }
        }
        PixelValues { data, height: h, width: w }
    }
}

/// Preprocessed pixels, channel-first: `data` is `[3, height, width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// `[3, H, W]` row-major.
    pub data: Vec<f32>,
    /// H.
    pub height: usize,
    /// W.
    pub width: usize,
}

impl PixelValues {
    /// As a `[1, 3, H, W]` f32 tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.data, (1, 3, self.height, self.width), device)?)
    }
}

/// Loads, converts and preprocesses an image file into `[3, H, W]` pixel values.
pub fn preprocess_file(
    path: impl AsRef<Path>,
    cfg: &PreprocessConfig,
    mode: AspectMode,
) -> Result<PixelValues> {
    let path = path.as_ref();
    let image = load_rgb(path)?;
    cfg.preprocess(&image, mode).map_err(|e| match e {
        Error::Usage(detail) => Error::Image { path: path.to_path_buf(), detail },
        other => other,
    })
}

/// Reads a PNG or JPEG file as 8-bit RGB, the way PIL's `Image.open(p).convert("RGB")` does.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_rgb_from_bytes(&bytes, path)
}

/// As [`load_rgb`] for bytes already in memory (an image inside a tar); `origin` names it.
///
/// Like PIL (and unlike `DynamicImage::to_rgb8`): alpha is dropped, not composited; 16-bit RGB
/// keeps the high byte; 16-bit grey (`I;16`) clips at 255. EXIF orientation is ignored, as it is
/// by `Image.open` in LLaVA and NeMo.
pub fn load_rgb_from_bytes(bytes: &[u8], origin: impl Into<PathBuf>) -> Result<RgbImage> {
    let origin = origin.into();
    let image = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image { path: origin.clone(), detail: e.to_string() })?
        .decode()
        .map_err(|e| Error::Image { path: origin.clone(), detail: e.to_string() })?;
    let (w, h) = (image.width(), image.height());
    let rgb: Vec<u8> = match &image {
        DynamicImage::ImageRgb8(img) => img.as_raw().clone(),
        DynamicImage::ImageRgba8(img) => {
            img.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect()
        }
        DynamicImage::ImageLuma8(img) => img.as_raw().iter().flat_map(|&v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(img) => img.as_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageRgb16(img) => img.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(img) => {
            img.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8)).collect()
        }
        DynamicImage::ImageLuma16(img) => img.as_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(img) => {
            img.as_raw().chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect()
        }
        other => {
            return Err(Error::Image {
                path: origin,
                detail: format!("unsupported pixel format {:?}", other.color()),
            })
        }
    };
    RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| Error::Image { path: origin, detail: "decoded buffer has the wrong size".into() })
}

/// LLaVA's `expand2square`: a `max(w, h)` square of `fill` with the image pasted at offset
/// `(max − min) // 2` along the short axis. Square images are returned unchanged.
pub fn expand_to_square(image: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    if w == h {
        return image.clone();
    }
    let side = w.max(h);
    let (x0, y0) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    image::imageops::replace(&mut out, image, x0 as i64, y0 as i64);
    out
}

/// Output (width, height) of transformers' `get_resize_output_image_size`.
pub fn resize_output_size(width: u32, height: u32, to: ResizeTo) -> (u32, u32) {
    match to {
        ResizeTo::Exact { height, width } => (width, height),
        ResizeTo::ShortestEdge(size) => {
            let (short, long) = if width <= height { (width, height) } else { (height, width) };
            // Python: int(size * long / short) — an exact integer product, a float division.
            let new_long = ((size as u64 * long as u64) as f64 / short as f64) as u32;
            if width <= height {
                (size, new_long)
            } else {
                (new_long, size)
            }
        }
    }
}

/// transformers' `center_crop` on the u8 image: `top = (h − crop_h) // 2` (floor), and when the
/// image is smaller than the crop, zero padding centred with `ceil`, as the reference does.
pub fn center_crop(image: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
    let (h, w) = (image.height() as i64, image.width() as i64);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    let mut top = (h - ch).div_euclid(2);
    let mut left = (w - cw).div_euclid(2);
    if top >= 0 && left >= 0 && top + ch <= h && left + cw <= w {
        return image::imageops::crop_imm(image, left as u32, top as u32, crop_w, crop_h).to_image();
    }
    let (new_h, new_w) = (ch.max(h), cw.max(w));
    let top_pad = (new_h - h + 1) / 2; // ceil((new_h - h) / 2), non-negative
    let left_pad = (new_w - w + 1) / 2;
    let mut canvas = RgbImage::new(new_w as u32, new_h as u32);
    image::imageops::replace(&mut canvas, image, left_pad, top_pad);
    top += top_pad;
    left += left_pad;
    let (y0, y1) = (top.max(0), (top + ch).min(new_h));
    let (x0, x1) = (left.max(0), (left + cw).min(new_w));
    image::imageops::crop_imm(&canvas, x0 as u32, y0 as u32, (x1 - x0) as u32, (y1 - y0) as u32).to_image()
}

/// Fixed-point precision of PIL's 8-bit resampler: 32 bits − 8 for the value − 2 headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, tap count, and `ksize` fixed-point weights.
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-image box `[0, in_size)`.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the kernel (antialiasing); upscaling keeps it at its natural width.
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let taps = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(taps) {
            *w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
            total += *w;
        }
        for (x, &w) in k.iter().enumerate().take(taps) {
            let w = if total != 0.0 { w / total } else { w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin, taps));
    }
    Coefficients { ksize, bounds, weights }
}

/// PIL's `clip8`: drop the fraction (arithmetic shift, i.e. floor) and clamp to u8.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL-exact `Image.resize((width, height), resample=filter)` of an RGB image.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let src = image.as_raw();
    let vert = coefficients(in_h, out_h, filter);
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;

    // Horizontal pass over only the rows the vertical pass will read, like PIL.
    let (tmp, tmp_first_row) = if need_horizontal {
        let first = vert.bounds[0].0;
        let (last_min, last_taps) = vert.bounds[out_h - 1];
        let last = last_min + last_taps;
        let horiz = coefficients(in_w, out_w, filter);
        let mut tmp = vec![0u8; (last - first) * out_w * 3]; // [rows, out_w, 3]
        for (ty, y) in (first..last).enumerate() {
            let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
            for xx in 0..out_w {
                let (xmin, taps) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + taps];
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (x, &w) in k.iter().enumerate() {
                    let px = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += px[c] as i64 * w as i64;
                    }
                }
                let o = (ty * out_w + xx) * 3;
                for c in 0..3 {
                    tmp[o + c] = clip8(acc[c]);
                }
            }
        }
        (tmp, first)
    } else {
        (src.clone(), 0)
    };
    if !need_vertical {
        // Either a horizontal-only resize (tmp holds every row) or no resize at all.
        return RgbImage::from_raw(width, height, tmp).unwrap_or_else(|| image.clone());
    }

    let mut out = vec![0u8; out_h * out_w * 3]; // [out_h, out_w, 3]
    for yy in 0..out_h {
        let (ymin, taps) = vert.bounds[yy];
        let ymin = ymin - tmp_first_row;
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + taps];
        for xx in 0..out_w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (y, &w) in k.iter().enumerate() {
                let o = ((ymin + y) * out_w + xx) * 3;
                for c in 0..3 {
                    acc[c] += tmp[o + c] as i64 * w as i64;
                }
            }
            let o = (yy * out_w + xx) * 3;
            for c in 0..3 {
                out[o + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(path)
    }

    fn golden(file: &str, key: &str) -> Vec<f32> {
        let tensors = candle_core::safetensors::load(fixture(file), &Device::Cpu).unwrap();
        let t = tensors.get(key).unwrap_or_else(|| panic!("{file} has no {key}"));
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn max_abs(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn clip_fixture_matches_clip_image_processor_bit_for_bit() {
        let dir = fixture("clip-vision");
        let cfg = PreprocessConfig::from_dir(&dir).unwrap();
        assert_eq!(cfg.size, ResizeTo::ShortestEdge(32));
        assert_eq!(cfg.crop_size, (32, 32));
        let pixels = preprocess_file(dir.join("image.png"), &cfg, AspectMode::Square).unwrap();
        assert_eq!((pixels.height, pixels.width), (32, 32));
        let want = golden("clip-vision/golden/golden.safetensors", "image_pixel_values");
        let err = max_abs(&pixels.data, &want);
        assert_eq!(err, 0.0, "max abs error {err}");
        let t = pixels.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 32, 32]);
    }

    #[test]
    fn llava_tiny_pad_and_square_match_when_present() {
        let dir = fixture("llava-tiny");
        let golden_file = "llava-tiny/golden/golden.safetensors";
        if !fixture(golden_file).is_file() {
            return; // fixture not generated yet
        }
        let cfg = PreprocessConfig::from_dir(&dir).unwrap();
        for (key, mode) in
            [("pixel_values_pad", AspectMode::Pad), ("pixel_values_square", AspectMode::Square)]
        {
            let want = golden(golden_file, key);
            let pixels = preprocess_file(dir.join("image.png"), &cfg, mode).unwrap();
            let err = max_abs(&pixels.data, &want);
            assert_eq!(err, 0.0, "{key}: max abs error {err}");
        }
    }

    /// A config whose images the tower cannot take is named before any image reaches it.
    #[test]
    fn a_config_for_another_tower_size_is_refused_by_name() {
        let origin = Path::new("ckpt");
        let bare = PreprocessConfig::from_json(&serde_json::json!({}), origin).unwrap();
        let err = bare.check_tower_size(32, AspectMode::Pad, origin).unwrap_err().to_string();
        assert!(err.contains("ckpt") && err.contains("224×224") && err.contains("32×32"), "{err}");
        PreprocessConfig::clip_with_size(32).check_tower_size(32, AspectMode::Square, origin).unwrap();
        // Sizes that depend on the image are left to the tower.
        bare.check_tower_size(32, AspectMode::Keep, origin).unwrap();
        let no_crop = PreprocessConfig { do_center_crop: false, ..bare.clone() };
        no_crop.check_tower_size(32, AspectMode::Square, origin).unwrap();
        no_crop.check_tower_size(224, AspectMode::Pad, origin).unwrap();
        assert!(no_crop.check_tower_size(32, AspectMode::Pad, origin).is_err());
    }

    #[test]
    fn pad_geometry() {
        let cfg = PreprocessConfig::default();
        assert_eq!(cfg.pad_color(), [122, 116, 104]);
        // 5 wide, 2 high: a 5×5 canvas with the image on rows (5 − 2) // 2 = 1 and 2.
        let img = RgbImage::from_pixel(5, 2, image::Rgb([1, 2, 3]));
        let sq = expand_to_square(&img, cfg.pad_color());
        assert_eq!(sq.dimensions(), (5, 5));
        let rows: Vec<bool> = (0..5).map(|y| sq.get_pixel(0, y).0 == [1, 2, 3]).collect();
        assert_eq!(rows, [false, true, true, false, false]);
        assert_eq!(sq.get_pixel(4, 4).0, [122, 116, 104]);
        // 2 wide, 5 high: image on columns 1 and 2.
        let img = RgbImage::from_pixel(2, 5, image::Rgb([9, 9, 9]));
        let sq = expand_to_square(&img, [0, 0, 0]);
        let cols: Vec<bool> = (0..5).map(|x| sq.get_pixel(x, 3).0 == [9, 9, 9]).collect();
        assert_eq!(cols, [false, true, true, false, false]);
        // Square images are untouched.
        let img = RgbImage::from_pixel(3, 3, image::Rgb([7, 7, 7]));
        assert_eq!(expand_to_square(&img, [0, 0, 0]), img);
    }

    #[test]
    fn resize_and_crop_geometry() {
        assert_eq!(resize_output_size(40, 24, ResizeTo::ShortestEdge(32)), (53, 32));
        assert_eq!(resize_output_size(24, 40, ResizeTo::ShortestEdge(32)), (32, 53));
        assert_eq!(resize_output_size(640, 480, ResizeTo::ShortestEdge(336)), (448, 336));
        assert_eq!(resize_output_size(7, 7, ResizeTo::Exact { height: 3, width: 5 }), (5, 3));
        // Odd excess: top = (7 − 4) // 2 = 1.
        let mut img = RgbImage::new(4, 7);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8, y as u8, 0]);
        }
        let c = center_crop(&img, 4, 4);
        assert_eq!(c.get_pixel(0, 0).0, [0, 1, 0]);
        // Smaller than the crop: zero-padded, centred with ceil.
        let c = center_crop(&RgbImage::from_pixel(1, 1, image::Rgb([5, 5, 5])), 4, 4);
        assert_eq!(c.dimensions(), (4, 4));
        let lit: Vec<(u32, u32)> =
            c.enumerate_pixels().filter(|(_, _, p)| p.0 == [5, 5, 5]).map(|(x, y, _)| (x, y)).collect();
        assert_eq!(lit, [(2, 2)]); // transformers gives the same for a 1×1 image
        let c = center_crop(&RgbImage::from_pixel(1, 2, image::Rgb([5, 5, 5])), 4, 5);
        let lit: Vec<(u32, u32)> =
            c.enumerate_pixels().filter(|(_, _, p)| p.0 == [5, 5, 5]).map(|(x, y, _)| (x, y)).collect();
        assert_eq!(lit, [(2, 1), (2, 2)]);
    }

    #[test]
    fn resize_identity_and_constant_images() {
        let img = RgbImage::from_fn(9, 6, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 7]));
        assert_eq!(resize(&img, 9, 6, Filter::Bicubic), img);
        // Normalised kernels keep a flat image flat in both directions.
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 128]));
        for (w, h) in [(11, 5), (80, 61), (37, 9), (5, 23)] {
            let out = resize(&flat, w, h, Filter::Bicubic);
            assert!(out.pixels().all(|p| p.0 == [200, 13, 128]), "{w}x{h}");
        }
    }

    #[test]
    fn config_parsing() {
        let origin = Path::new("preprocessor_config.json");
        let cfg = PreprocessConfig::from_json(&serde_json::json!({}), origin).unwrap();
        assert_eq!(cfg, PreprocessConfig::clip_with_size(224));
        let cfg =
            PreprocessConfig::from_json(&serde_json::json!({"size": 336, "crop_size": 336}), origin).unwrap();
        assert_eq!(cfg, PreprocessConfig::default());
        let err = PreprocessConfig::from_json(&serde_json::json!({"resample": 0}), origin).unwrap_err();
        assert!(err.to_string().contains("preprocessor_config.json: resample"), "{err}");
        let err = PreprocessConfig::from_json(&serde_json::json!({"image_mean": [0.5]}), origin).unwrap_err();
        assert!(err.to_string().contains("image_mean"), "{err}");
        assert!(PreprocessConfig::from_json(
            &serde_json::json!({"image_processor_type": "SiglipImageProcessor"}),
            origin
        )
        .is_err());
        assert_eq!(AspectMode::parse("pad").unwrap(), AspectMode::Pad);
        assert!(AspectMode::parse("crop").is_err());
    }

    #[test]
    fn unreadable_images_name_the_file() {
        let err = load_rgb_from_bytes(b"not an image", "x/cat.png").unwrap_err().to_string();
        assert!(err.contains("x/cat.png"), "{err}");
        let err = load_rgb("/nonexistent/cat.png").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cat.png"), "{err}");
    }
}
