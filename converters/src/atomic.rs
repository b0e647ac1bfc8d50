//! Atomic outputs: write under a temporary name in the destination's directory, fsync, rename.
//!
//! A failed or killed run leaves at most a hidden `.<name>.tmp-XXXX` file or directory, never
//! something at the destination path that looks complete.

use crate::error::{Error, IoContext, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// A file being written; it appears at its destination only after [`AtomicFile::commit`].
pub struct AtomicFile {
    temp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    /// Start writing `dest`. Fails if `dest` exists and `overwrite` is false.
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        if !overwrite && dest.exists() {
            return Err(Error::OutputExists { path: dest.to_path_buf() });
        }
        let dir = parent_dir(dest);
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{}.tmp-", file_name(dest)))
            .tempfile_in(&dir)
            .at(&dir)?;
        Ok(AtomicFile { temp, dest: dest.to_path_buf() })
    }

    /// The file to write into.
    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// The destination path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flush to disk and move into place. Dropping without committing deletes the temp file.
    pub fn commit(self) -> Result<()> {
        // tempfile creates 0600; a finished checkpoint gets ordinary file permissions.
        set_mode(self.temp.path(), 0o644)?;
        self.temp.as_file().sync_all().at(&self.dest)?;
        self.temp.persist(&self.dest).map_err(|e| Error::Io { path: self.dest.clone(), source: e.error })?;
        sync_dir(&parent_dir(&self.dest));
        Ok(())
    }
}

/// A directory being written; it appears at its destination only after [`AtomicDir::commit`].
pub struct AtomicDir {
    temp: Option<tempfile::TempDir>,
    dest: PathBuf,
    overwrite: bool,
}

impl AtomicDir {
    /// Start writing directory `dest`. Fails if it exists and `overwrite` is false.
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        if !overwrite && dest.exists() {
            return Err(Error::OutputExists { path: dest.to_path_buf() });
        }
        let dir = parent_dir(dest);
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{}.tmp-", file_name(dest)))
            .tempdir_in(&dir)
            .at(&dir)?;
        Ok(AtomicDir { temp: Some(temp), dest: dest.to_path_buf(), overwrite })
    }

    /// Where to write the directory's contents for now.
    pub fn path(&self) -> &Path {
        self.temp.as_ref().expect("present until commit").path()
    }

    /// Move into place (replacing an existing destination when overwriting was allowed).
    pub fn commit(mut self) -> Result<()> {
        let temp = self.temp.take().expect("present until commit");
        let staged = temp.keep();
        set_mode(&staged, 0o755)?;
        if self.overwrite && self.dest.exists() {
            let old = staged.with_extension("old");
            std::fs::rename(&self.dest, &old).at(&self.dest)?;
            std::fs::rename(&staged, &self.dest).at(&self.dest)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&staged, &self.dest).at(&self.dest)?;
        }
        sync_dir(&parent_dir(&self.dest));
        Ok(())
    }
}

/// Where an output that must appear together with others is written first: a hidden name
/// beside its destination (same filesystem, so [`commit_together`] only renames).
pub fn staging_path(dest: &Path) -> PathBuf {
    parent_dir(dest).join(format!(".{}.tmp-staged-{}", file_name(dest), std::process::id()))
}

/// Move staged outputs (`(staged, dest)`, written at [`staging_path`]) into place together: a
/// destination already there is set aside until every output has moved, then removed; if one
/// cannot move, those already moved are removed and what they replaced is put back. Between
/// two renames a crash can still leave some moved, but never a half-written output.
pub fn commit_together(outputs: &[(PathBuf, PathBuf)]) -> Result<()> {
    let mut moved: Vec<(&Path, Option<PathBuf>)> = Vec::new();
    let undo = |moved: &[(&Path, Option<PathBuf>)]| {
        for (dest, aside) in moved.iter().rev() {
            remove_any(dest);
            if let Some(a) = aside {
                let _ = std::fs::rename(a, dest);
            }
        }
    };
    for (staged, dest) in outputs {
        let aside = if dest.symlink_metadata().is_ok() {
            let a =
                parent_dir(dest).join(format!(".{}.tmp-replaced-{}", file_name(dest), std::process::id()));
            if let Err(e) = std::fs::rename(dest, &a) {
                undo(&moved);
                return Err(Error::Io { path: dest.clone(), source: e });
            }
            Some(a)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(staged, dest) {
            if let Some(a) = &aside {
                let _ = std::fs::rename(a, dest);
            }
            undo(&moved);
            return Err(Error::Io { path: dest.clone(), source: e });
        }
        moved.push((dest, aside));
    }
    for (dest, aside) in moved {
        if let Some(a) = aside {
            remove_any(&a);
        }
        sync_dir(&parent_dir(dest));
    }
    Ok(())
}

/// Remove a file or directory tree, best effort (staged or replaced outputs).
pub fn remove_any(path: &Path) {
    let _ = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).at(path)
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> Result<()> {
    Ok(())
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into())
}

/// Best effort: make the rename durable. Not all filesystems allow opening a directory.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Outputs committed together replace what was there; when one cannot move, the others are
    /// taken back and what they replaced is restored.
    #[test]
    fn outputs_committed_together_appear_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (file, sub) = (dir.path().join("m.nemo"), dir.path().join("m-clip"));
        std::fs::write(&file, b"old").unwrap();
        let (sf, sd) = (staging_path(&file), staging_path(&sub));
        std::fs::write(&sf, b"new").unwrap();
        std::fs::create_dir(&sd).unwrap();
        std::fs::write(sd.join("config.json"), b"{}").unwrap();
        commit_together(&[(sd.clone(), sub.clone()), (sf.clone(), file.clone())]).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert!(sub.join("config.json").is_file());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "nothing staged or set aside is left");
        // The second output's staged copy is missing: the first is taken back, the old restored.
        std::fs::create_dir(&sd).unwrap();
        std::fs::write(sd.join("config.json"), b"{\"v\": 2}").unwrap();
        let err = commit_together(&[(sd.clone(), sub.clone()), (sf.clone(), file.clone())]).unwrap_err();
        assert!(err.to_string().contains("m.nemo"), "{err}");
        assert_eq!(std::fs::read(sub.join("config.json")).unwrap(), b"{}");
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.safetensors");
        {
            let mut f = AtomicFile::create(&dest, false).unwrap();
            f.file().write_all(b"partial").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn committed_dir_appears_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("model");
        let d = AtomicDir::create(&dest, false).unwrap();
        std::fs::write(d.path().join("a"), b"x").unwrap();
        d.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"x");
        assert!(matches!(AtomicDir::create(&dest, false), Err(Error::OutputExists { .. })));
    }
}
