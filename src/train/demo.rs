//! A synthetic visual question-answering set for the end-to-end demo: images of one coloured
//! shape (circle, square or triangle; red, green, blue or yellow) at a random place and size on
//! a light background, with questions about its colour and shape and a short caption, in the
//! LLaVA training JSON format (formats.md §9.1). Deterministic in its seed.
//!
//! `train.json` and `test.json` share no (colour, shape, position, size) drawing: the test
//! images are new, so answering them needs the image, not memory.

use crate::rng::SplitMix64;
use crate::{Error, Result};
use image::{Rgb, RgbImage};
use serde_json::json;
use std::path::Path;

/// Colours and their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 4] =
    [("red", [220, 30, 30]), ("green", [30, 180, 40]), ("blue", [30, 60, 220]), ("yellow", [235, 215, 20])];

/// Shapes.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// The questions and how each is answered from (colour, shape).
pub const QUESTIONS: [(&str, Answer); 3] = [
    ("What color is the shape?", Answer::Colour),
    ("What shape is it?", Answer::Shape),
    ("Describe the image.", Answer::Caption),
];

/// What a question asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The colour word.
    Colour,
    /// The shape word.
    Shape,
    /// "a {colour} {shape}".
    Caption,
}

impl Answer {
    /// The expected answer text.
    pub fn text(self, colour: &str, shape: &str) -> String {
        match self {
            Answer::Colour => colour.to_string(),
            Answer::Shape => shape.to_string(),
            Answer::Caption => format!("a {colour} {shape}"),
        }
    }
}

/// Draw one image: `shape` in `colour`, centre (cx, cy), half-size r, on a light grey field.
pub fn draw(side: u32, colour: [u8; 3], shape: &str, cx: f32, cy: f32, r: f32) -> RgbImage {
    RgbImage::from_fn(side, side, |x, y| {
        let (px, py) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let inside = match shape {
            "circle" => px * px + py * py <= r * r,
            "square" => px.abs() <= r * 0.85 && py.abs() <= r * 0.85,
            // Apex up: inside when below the two slanted edges and above the base.
            _ => py <= r * 0.8 && py >= -r && px.abs() <= (py + r) * 0.6,
        };
        if inside {
            Rgb(colour)
        } else {
            Rgb([235, 235, 235])
        }
    })
}

/// One record: image file name, colour and shape.
#[derive(Clone, Debug)]
pub struct Drawn {
    /// File name under `images/`.
    pub file: String,
    /// Colour word.
    pub colour: &'static str,
    /// Shape word.
    pub shape: &'static str,
}

/// A drawing's radius for the random draw `k` in `0..100`: large, so that at the tiny tower's
/// 8-pixel patches the shapes differ in which patches they fill, which a frozen random tower
/// still shows.
fn radius(side: u32, k: u64) -> f32 {
    side as f32 * (0.34 + 0.1 * (k as f32 / 100.0))
}

/// A centre coordinate for the random draw `j` in `0..5`: near the middle.
fn centre(side: u32, j: u64) -> f32 {
    side as f32 / 2.0 + (j as f32 - 2.0) * side as f32 / 32.0
}

/// How many different drawings exist at `side` pixels: (colour, shape, centre, radius) in whole
/// pixels, as `write` tells them apart.
pub fn distinct_drawings(side: u32) -> usize {
    let count = |values: &mut dyn Iterator<Item = f32>| {
        values.map(|v| v as u32).collect::<std::collections::HashSet<_>>().len()
    };
    let centres = count(&mut (0..5).map(|j| centre(side, j)));
    let radii = count(&mut (0..100).map(|k| radius(side, k)));
    COLOURS.len() * SHAPES.len() * centres * centres * radii
}

/// `--force` replaces a demo set, never a directory holding anything else (`-o ~/data` by mistake).
fn refuse_foreign_contents(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries {
        let name = e.map_err(|e| Error::io(dir, e))?.file_name();
        if !matches!(name.to_str(), Some("images" | "train.json" | "test.json")) {
            return Err(Error::Usage(format!(
                "{} holds {name:?}, which no demo set has; not replacing it (choose another -o)",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Write `images/`, `train.json` (`train` images × every question) and `test.json` (`test`
/// images × every question) as the directory `dir` (replacing it only when `overwrite`); images
/// are `side` pixels square and all different. The directory appears whole or not at all.
pub fn write(
    dir: &Path,
    train: usize,
    test: usize,
    side: u32,
    seed: u64,
    overwrite: bool,
) -> Result<(Vec<Drawn>, Vec<Drawn>)> {
    let available = distinct_drawings(side);
    let wanted = train.checked_add(test).filter(|&n| n <= available).ok_or_else(|| {
        Error::Usage(format!(
            "--train {train} and --test {test} ask for more images than the {available} different \
             drawings there are at --size {side}; ask for fewer or a larger size"
        ))
    })?;
    if overwrite {
        refuse_foreign_contents(dir)?;
    }
    let staged = shardsmith_converters::atomic::AtomicDir::create(dir, overwrite)?;
    let images = staged.path().join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let mut rng = SplitMix64::new(seed);
    // `% n` (slightly biased) is kept: it fixes which drawings a seed gives.
    let mut below = |n: u64| rng.next_u64() % n;
    let mut seen = std::collections::HashSet::new();
    let mut all = Vec::with_capacity(wanted);
    while all.len() < wanted {
        let (ci, si) = (below(4) as usize, below(3) as usize);
        let r = radius(side, below(100));
        let cx = centre(side, below(5));
        let cy = centre(side, below(5));
        if !seen.insert((ci, si, cx as u32, cy as u32, r as u32)) {
            continue;
        }
        let file = format!("{:05}.png", all.len());
        let img = draw(side, COLOURS[ci].1, SHAPES[si], cx, cy, r);
        let path = images.join(&file);
        img.save(&path)
            .map_err(|e| Error::Image { path: dir.join("images").join(&file), detail: e.to_string() })?;
        all.push(Drawn { file, colour: COLOURS[ci].0, shape: SHAPES[si] });
    }
    let test_set = all.split_off(train);
    for (name, set) in [("train.json", &all), ("test.json", &test_set)] {
        let records: Vec<_> = set
            .iter()
            .flat_map(|d| {
                QUESTIONS.iter().enumerate().map(move |(qi, (q, a))| {
                    json!({
                        "id": format!("{}-{qi}", d.file.trim_end_matches(".png")),
                        "image": d.file,
                        "conversations": [
                            {"from": "human", "value": format!("<image>\n{q}")},
                            {"from": "gpt", "value": a.text(d.colour, d.shape)},
                        ],
                    })
                })
            })
            .collect();
        let path = staged.path().join(name);
        let text = serde_json::to_string_pretty(&records).map_err(|e| Error::Usage(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(dir.join(name), e))?;
    }
    staged.commit()?;
    Ok((all, test_set))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_is_deterministic_and_disjoint() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (train, test) = write(&a.path().join("d"), 20, 6, 32, 7, false).unwrap();
        write(&b.path().join("d"), 20, 6, 32, 7, false).unwrap();
        for f in ["train.json", "test.json", "images/00003.png", "images/00025.png"] {
            assert_eq!(
                std::fs::read(a.path().join("d").join(f)).unwrap(),
                std::fs::read(b.path().join("d").join(f)).unwrap(),
                "{f}"
            );
        }
        assert_eq!((train.len(), test.len()), (20, 6));
        let records: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.path().join("d/train.json")).unwrap()).unwrap();
        assert_eq!(records.as_array().unwrap().len(), 60);
        assert_eq!(records[0]["conversations"][0]["value"], "<image>\nWhat color is the shape?");
    }

    #[test]
    fn shapes_are_drawn_in_their_colour() {
        let img = draw(32, [220, 30, 30], "circle", 16.0, 16.0, 8.0);
        assert_eq!(img.get_pixel(16, 16).0, [220, 30, 30]);
        assert_eq!(img.get_pixel(1, 1).0, [235, 235, 235]);
        let tri = draw(32, [30, 60, 220], "triangle", 16.0, 16.0, 10.0);
        assert_eq!(tri.get_pixel(16, 20).0, [30, 60, 220]); // near the base, centre
        assert_eq!(tri.get_pixel(8, 8).0, [235, 235, 235]); // beside the apex
    }

    #[test]
    fn every_distinct_drawing_can_be_asked_for_and_no_more() {
        let root = tempfile::tempdir().unwrap();
        let side = 8;
        let n = distinct_drawings(side);
        // 12 (colour, shape) × centres² × radii; at 8 pixels the centres are 3, 3, 4, 4, 4 → 2.
        assert_eq!(n, 12 * 2 * 2 * distinct_radii(side));
        let (train, test) = write(&root.path().join("all"), n - 1, 1, side, 0, false).unwrap();
        assert_eq!(train.len() + test.len(), n);

        let more = root.path().join("more");
        let err = write(&more, n, 1, side, 0, false).unwrap_err().to_string();
        assert!(err.contains(&format!("the {n} different drawings there are at --size 8")), "{err}");
        let err = write(&more, usize::MAX, 1, side, 0, false).unwrap_err().to_string();
        assert!(err.contains("ask for fewer"), "{err}");
        assert!(!more.exists(), "a refused set writes nothing");
    }

    #[test]
    fn an_existing_directory_is_replaced_only_when_asked() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("d");
        write(&dir, 2, 1, 16, 0, false).unwrap();
        let err = write(&dir, 2, 1, 16, 0, false).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        write(&dir, 3, 1, 16, 0, true).unwrap();
        assert!(dir.join("images/00003.png").exists());
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let err = write(&dir, 3, 1, 16, 0, true).unwrap_err().to_string();
        assert!(err.contains("holds \"notes.txt\", which no demo set has; not replacing it"), "{err}");
        assert!(dir.join("notes.txt").exists());
        let leftovers: Vec<_> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["d"], "no staging directory is left behind");
    }

    fn distinct_radii(side: u32) -> usize {
        (0..100).map(|k| radius(side, k) as u32).collect::<std::collections::HashSet<_>>().len()
    }
}
