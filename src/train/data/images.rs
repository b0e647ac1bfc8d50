//! Where the records' images live: a directory, or (like NeMo's `TarOrFolderImageLoader`) an
//! uncompressed `.tar` of images, memory-mapped and indexed once by member name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use shardsmith_converters::checkpoint::ByteSource;
use shardsmith_converters::formats::nemo::{list_members, MemberKind};

use super::BadReason;
use crate::infer::image::{load_rgb, load_rgb_from_bytes, AspectMode, PixelValues, PreprocessConfig};
use crate::{Error, Result};

/// A directory or a `.tar` of images.
pub struct ImageStore {
    root: PathBuf,
    tar: Option<TarImages>,
}

struct TarImages {
    bytes: ByteSource,
    /// Normalised member name → (offset, length) in the archive.
    members: HashMap<String, (usize, usize)>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .field("tar_members", &self.tar.as_ref().map(|t| t.members.len()))
            .finish()
    }
}

impl ImageStore {
    /// A directory, or a file whose name ends in `.tar`.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Ok(Self { root: path.to_path_buf(), tar: None });
        }
        if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tar")) {
            return Err(Error::config(path, "the image folder must be a directory or a .tar of images"));
        }
        let map = shardsmith_converters::formats::map_file(path)?;
        let len = map.len();
        let bytes = ByteSource::mapped(map, 0, len);
        let image = bytes.bytes()?;
        let members = list_members(&image, path)?
            .into_iter()
            .filter(|m| m.kind == MemberKind::File)
            .map(|m| (m.name, (m.offset, m.len)))
            .collect();
        drop(image);
        Ok(Self { root: path.to_path_buf(), tar: Some(TarImages { bytes, members }) })
    }

    /// How an image is named in messages: the file path, or `archive.tar:member`.
    pub fn describe(&self, name: &str) -> PathBuf {
        match &self.tar {
            None => self.root.join(name),
            Some(_) => PathBuf::from(format!("{}:{}", self.root.display(), tar_key(name))),
        }
    }

    /// Whether the image exists.
    pub fn exists(&self, name: &str) -> std::result::Result<(), BadReason> {
        let found = match &self.tar {
            None => self.root.join(name).is_file(),
            Some(tar) => tar.members.contains_key(tar_key(name)),
        };
        if found {
            Ok(())
        } else {
            Err(BadReason::MissingImage(self.describe(name)))
        }
    }

    /// Cheap check that the image exists and its header decodes (no pixels are decoded).
    pub fn check(&self, name: &str) -> std::result::Result<(), BadReason> {
        let unreadable = |detail: String| BadReason::UnreadableImage { path: self.describe(name), detail };
        match &self.tar {
            None => {
                let path = self.root.join(name);
                if !path.is_file() {
                    return Err(BadReason::MissingImage(path));
                }
                image::ImageReader::open(&path)
                    .map_err(|e| unreadable(e.to_string()))?
                    .with_guessed_format()
                    .map_err(|e| unreadable(e.to_string()))?
                    .into_dimensions()
                    .map_err(|e| unreadable(e.to_string()))?;
            }
            Some(tar) => {
                let bytes = tar.member(name).ok_or_else(|| BadReason::MissingImage(self.describe(name)))?;
                let bytes = bytes.map_err(|e| unreadable(e.to_string()))?;
                image::ImageReader::new(std::io::Cursor::new(&*bytes))
                    .with_guessed_format()
                    .map_err(|e| unreadable(e.to_string()))?
                    .into_dimensions()
                    .map_err(|e| unreadable(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Decodes and preprocesses one image into `[3, H, W]` pixel values.
    pub fn load(
        &self,
        name: &str,
        cfg: &PreprocessConfig,
        mode: AspectMode,
    ) -> std::result::Result<PixelValues, BadReason> {
        let rgb = match &self.tar {
            None => {
                let path = self.root.join(name);
                if !path.is_file() {
                    return Err(BadReason::MissingImage(path));
                }
                load_rgb(&path)
            }
            Some(tar) => {
                let bytes = tar.member(name).ok_or_else(|| BadReason::MissingImage(self.describe(name)))?;
                bytes.map_err(Error::from).and_then(|b| load_rgb_from_bytes(&b, self.describe(name)))
            }
        };
        let unreadable = |e: Error| BadReason::UnreadableImage {
            path: self.describe(name),
            detail: match e {
                Error::Image { detail, .. } => detail,
                other => other.to_string(),
            },
        };
        cfg.preprocess(&rgb.map_err(unreadable)?, mode).map_err(unreadable)
    }
}

/// Member names are looked up as the tar index stores them: no `./` prefix.
fn tar_key(name: &str) -> &str {
    let mut key = name;
    while let Some(rest) = key.strip_prefix("./") {
        key = rest;
    }
    key
}

impl TarImages {
    fn member(
        &self,
        name: &str,
    ) -> Option<std::result::Result<std::borrow::Cow<'_, [u8]>, shardsmith_converters::Error>> {
        let &(offset, len) = self.members.get(tar_key(name))?;
        Some(self.bytes.bytes().map(|all| match all {
            std::borrow::Cow::Borrowed(b) => std::borrow::Cow::Borrowed(&b[offset..offset + len]),
            std::borrow::Cow::Owned(b) => std::borrow::Cow::Owned(b[offset..offset + len].to_vec()),
        }))
    }
}
