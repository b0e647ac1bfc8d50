//! The loss-curve PNG: a line chart with a title, axis names, grid lines and numbered ticks,
//! drawn with the `image` crate and the public-domain 8×8 bitmap font of `font8x8` (no system
//! fonts, no plotting library).

use super::metrics::{read_records, write_atomically};
use crate::{Error, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

/// Width of the chart in pixels.
pub const PLOT_WIDTH: u32 = 800;
/// Height of the chart in pixels.
pub const PLOT_HEIGHT: u32 = 500;

const LEFT: i64 = 96;
const RIGHT: i64 = 24;
const TOP: i64 = 48;
const BOTTOM: i64 = 64;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const TEXT: Rgb<u8> = Rgb([40, 40, 40]);
/// The curve's colour.
pub const LINE: Rgb<u8> = Rgb([31, 119, 180]);

/// Plots the `loss` of every record in a metrics JSONL against `step` into `out_png`.
pub fn plot_loss_jsonl(jsonl: &Path, out_png: &Path, title: &str) -> Result<()> {
    let points: Vec<(f64, f64)> = read_records(jsonl)?.iter().map(|r| (r.step as f64, r.loss)).collect();
    plot_loss(&points, out_png, title)
}

/// Draws `(step, loss)` points as a line chart of [`PLOT_WIDTH`] × [`PLOT_HEIGHT`] and writes it
/// to `out_png` atomically. Non-finite points are left out; with none left the chart is empty
/// and says so.
pub fn plot_loss(points: &[(f64, f64)], out_png: &Path, title: &str) -> Result<()> {
    let img = render(points, title);
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Image { path: out_png.into(), detail: e.to_string() })?;
    write_atomically(out_png, |tmp| {
        std::fs::write(tmp, &png).map_err(|source| Error::Io { path: tmp.into(), source })
    })
}

/// The chart as an image.
pub fn render(points: &[(f64, f64)], title: &str) -> RgbImage {
    let (w, h) = (PLOT_WIDTH as i64, PLOT_HEIGHT as i64);
    let mut img = RgbImage::from_pixel(PLOT_WIDTH, PLOT_HEIGHT, WHITE);
    let pts: Vec<(f64, f64)> =
        points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();

    let (x0, x1) = padded_range(pts.iter().map(|p| p.0), 0.0);
    let (y0, y1) = padded_range(pts.iter().map(|p| p.1), 0.05);
    let xt = ticks(x0, x1, 8, true);
    let yt = ticks(y0, y1, 8, false);
    let (x0, x1) = (xt.lo, xt.hi);
    let (y0, y1) = (yt.lo, yt.hi);
    let (px0, px1, py0, py1) = (LEFT, w - RIGHT, TOP, h - BOTTOM);
    let sx = |x: f64| px0 as f64 + (x - x0) / (x1 - x0) * (px1 - px0) as f64;
    let sy = |y: f64| py1 as f64 - (y - y0) / (y1 - y0) * (py1 - py0) as f64;

    // Grid, ticks and their labels.
    for &v in &xt.values {
        let x = sx(v).round() as i64;
        line(&mut img, (x, py0), (x, py1), GRID);
        line(&mut img, (x, py1), (x, py1 + 5), BLACK);
        let label = format_tick(v, xt.step);
        text(&mut img, x - text_width(&label, 1) / 2, py1 + 10, &label, 1, TEXT);
    }
    for &v in &yt.values {
        let y = sy(v).round() as i64;
        line(&mut img, (px0, y), (px1, y), GRID);
        line(&mut img, (px0 - 5, y), (px0, y), BLACK);
        let label = format_tick(v, yt.step);
        text(&mut img, px0 - 10 - text_width(&label, 1), y - 4, &label, 1, TEXT);
    }
    // Axes box.
    line(&mut img, (px0, py0), (px1, py0), BLACK);
    line(&mut img, (px0, py1), (px1, py1), BLACK);
    line(&mut img, (px0, py0), (px0, py1), BLACK);
    line(&mut img, (px1, py0), (px1, py1), BLACK);

    // Title and axis names.
    text(&mut img, (w - text_width(title, 2)) / 2, 14, title, 2, BLACK);
    text(&mut img, (px0 + px1 - text_width("step", 2)) / 2, h - 26, "step", 2, BLACK);
    text_up(&mut img, 10, (py0 + py1 + text_width("loss", 2)) / 2, "loss", 2, BLACK);

    if pts.is_empty() {
        let msg = "no finite losses";
        text(&mut img, (px0 + px1 - text_width(msg, 2)) / 2, (py0 + py1) / 2 - 8, msg, 2, TEXT);
        return img;
    }
    // The curve, 2 px thick, with dots when there are few points.
    let screen: Vec<(i64, i64)> =
        pts.iter().map(|&(x, y)| (sx(x).round() as i64, sy(y).round() as i64)).collect();
    for pair in screen.windows(2) {
        thick_line(&mut img, pair[0], pair[1], LINE);
    }
    if screen.len() <= 60 {
        for &(x, y) in &screen {
            fill_rect(&mut img, x - 2, y - 2, 5, 5, LINE);
        }
    }
    img
}

/// `(lo, hi)` of the values with `frac` of the span added on each side; a single value (or
/// none) gets a unit-scale span around it.
fn padded_range(vals: impl Iterator<Item = f64>, frac: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = (hi.abs() * 0.1).max(1.0);
        return (lo - d, hi + d);
    }
    let pad = (hi - lo) * frac;
    (lo - pad, hi + pad)
}

struct Ticks {
    lo: f64,
    hi: f64,
    step: f64,
    values: Vec<f64>,
}

/// Nice ticks (1, 2 or 5 × 10^k apart, about `target` of them) covering `[lo, hi]`; the range
/// is widened to whole ticks. `integer` keeps the spacing at least 1.
fn ticks(lo: f64, hi: f64, target: usize, integer: bool) -> Ticks {
    let raw = (hi - lo) / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    if integer {
        step = step.max(1.0).round();
    }
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    let values: Vec<f64> = (0..=(last - first) as i64).map(|i| (first + i as f64) * step).collect();
    Ticks { lo: first * step, hi: last * step, step, values }
}

/// A tick value with as many decimals as the spacing needs (scientific when tiny or huge).
fn format_tick(v: f64, step: f64) -> String {
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    if step >= 1e6 || (step < 1e-4 && v != 0.0) {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(img, xx, yy, c);
        }
    }
}

/// Bresenham.
fn line(img: &mut RgbImage, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

fn thick_line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>) {
    for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        line(img, (a.0 + ox, a.1 + oy), (b.0 + ox, b.1 + oy), c);
    }
}

fn glyph(ch: char) -> [u8; 8] {
    let i = ch as usize;
    if i < 128 {
        font8x8::legacy::BASIC_LEGACY[i]
    } else {
        font8x8::legacy::BASIC_LEGACY['?' as usize]
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 8 * scale
}

/// Left-to-right text with its top-left corner at (x, y).
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
    for (k, ch) in s.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    let gx = x + (k as i64 * 8 + col) * scale;
                    fill_rect(img, gx, y + row as i64 * scale, scale, scale, c);
                }
            }
        }
    }
}

/// Bottom-to-top text (rotated 90° anticlockwise), its baseline start at (x, y).
fn text_up(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
    for (k, ch) in s.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    let along = (k as i64 * 8 + col) * scale;
                    fill_rect(img, x + row as i64 * scale, y - along - scale, scale, scale, c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(img: &RgbImage, c: Rgb<u8>, x: std::ops::Range<u32>, y: std::ops::Range<u32>) -> usize {
        y.flat_map(|yy| x.clone().map(move |xx| (xx, yy)))
            .filter(|&(xx, yy)| *img.get_pixel(xx, yy) == c)
            .count()
    }

    #[test]
    fn writes_a_png_of_the_right_size() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.png");
        let pts: Vec<(f64, f64)> =
            (1..=100).map(|s| (s as f64, 3.0 * (-(s as f64) / 30.0).exp() + 0.2)).collect();
        plot_loss(&pts, &out, "train loss").unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (PLOT_WIDTH, PLOT_HEIGHT));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
        // Curve pixels inside the plot area, title ink at the top, tick labels left of the axis.
        let (w, h) = (PLOT_WIDTH, PLOT_HEIGHT);
        assert!(count(&img, LINE, LEFT as u32..w - RIGHT as u32, TOP as u32..h - BOTTOM as u32) > 500);
        assert!(count(&img, BLACK, 0..w, 0..TOP as u32) > 100);
        assert!(count(&img, TEXT, 0..LEFT as u32 - 8, TOP as u32..h - BOTTOM as u32) > 50);
        assert!(count(&img, TEXT, LEFT as u32..w, h - BOTTOM as u32 + 8..h - 30) > 50);
        // The first point is high on the left, the last low on the right.
        let first_col = (LEFT as u32..LEFT as u32 + 12).flat_map(|x| (0..h).map(move |y| (x, y)));
        let ys: Vec<u32> = first_col.filter(|&(x, y)| *img.get_pixel(x, y) == LINE).map(|p| p.1).collect();
        assert!(!ys.is_empty() && ys.iter().max().unwrap() < &(h / 3), "{ys:?}");
        // Overwriting an existing chart works.
        plot_loss(&pts[..10], &out, "again").unwrap();
        assert_eq!(image::open(&out).unwrap().width(), PLOT_WIDTH);
    }

    #[test]
    fn from_jsonl_and_degenerate_inputs() {
        use crate::train::metrics::{MetricsLog, StepRecord};
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&log_path).unwrap();
        for s in 1..=3u64 {
            log.append(&StepRecord {
                step: s,
                loss: if s == 2 { f64::NAN } else { 1.0 / s as f64 },
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 10,
                consumed_samples: s,
                tokens_per_s: 1.0,
                elapsed_s: 1.0,
                extra: Default::default(),
            })
            .unwrap();
        }
        let out = dir.path().join("loss.png");
        plot_loss_jsonl(&log_path, &out, "loss").unwrap();
        assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (PLOT_WIDTH, PLOT_HEIGHT));
        // One point, no points, all-equal losses: still a chart.
        for pts in [vec![(1.0, 2.0)], vec![], vec![(1.0, 0.5), (2.0, 0.5)], vec![(1.0, f64::NAN)]] {
            let img = render(&pts, "t");
            assert_eq!(img.dimensions(), (PLOT_WIDTH, PLOT_HEIGHT));
        }
        let e = plot_loss_jsonl(&dir.path().join("missing.jsonl"), &out, "x").unwrap_err().to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn tick_choice_and_labels() {
        let t = ticks(0.2, 3.2, 6, false);
        assert_eq!(t.step, 0.5);
        assert_eq!((t.lo, t.hi), (0.0, 3.5));
        assert_eq!(
            t.values.iter().map(|v| format_tick(*v, t.step)).collect::<Vec<_>>(),
            ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5"]
        );
        let t = ticks(1.0, 100.0, 8, true);
        assert_eq!((t.step, t.lo, t.hi), (20.0, 0.0, 100.0));
        assert_eq!(format_tick(40.0, 20.0), "40");
        let t = ticks(1.0, 3.0, 8, true);
        assert_eq!(t.step, 1.0);
        assert_eq!(format_tick(0.0123, 0.005), "0.012");
        assert_eq!(format_tick(2e-5, 1e-5), "2.0e-5");
        assert_eq!(format_tick(3e6, 1e6), "3.0e6");
        assert_eq!(format_tick(1e-17, 0.1), "0.0");
    }
}
