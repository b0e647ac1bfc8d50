//! A variant picked by an environment variable, by name: the bf16 attention kernels
//! (`ops::attention::{FlashForward, FlashBackward}`) and the CUDA GEMM library
//! (`ops::linear::GemmBackend`), each kept selectable until GPU measurements settle on one.

use candle_core::{bail, Result};

/// The variants of one choice and how the environment names them. The default (unset or empty
/// variable) is [`EnvChoice::default_choice`], the first of `CHOICES` unless a choice overrides it.
pub(crate) trait EnvChoice: Copy + PartialEq + Send + Sync + 'static {
    /// The environment variable.
    const VAR: &'static str;
    /// What a variant is, for errors ("attention kernel").
    const NOUN: &'static str;
    /// Each variant's spelling.
    const CHOICES: &'static [(&'static str, Self)];
    /// Where the variable's value is kept once read.
    fn cell() -> &'static std::sync::OnceLock<std::result::Result<Self, String>>;
    /// Why this variant cannot run in this build, if it cannot (follows "VAR=spelling ").
    fn unavailable(self) -> Option<String> {
        None
    }

    fn spelling(self) -> &'static str {
        Self::CHOICES.iter().find(|(_, c)| *c == self).map_or("?", |(n, _)| n)
    }

    fn expected() -> String {
        Self::CHOICES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }

    /// The variant spelled `name`, or an error listing the spellings.
    fn by_name(name: &str) -> Result<Self> {
        match Self::CHOICES.iter().find(|(n, _)| *n == name) {
            Some((_, c)) => Ok(*c),
            None => bail!(
                "{} {name:?} (as {} names them): expected one of {}",
                Self::NOUN,
                Self::VAR,
                Self::expected()
            ),
        }
    }

    /// The variant taken when the variable is unset or empty: the first of `CHOICES` unless
    /// the choice says otherwise (one this build cannot run is never the default).
    fn default_choice() -> Self {
        Self::CHOICES[0].1
    }

    /// The variable's `value` (the default when unset or empty).
    fn parse(value: Option<&str>) -> std::result::Result<Self, String> {
        match value {
            None | Some("") => Ok(Self::default_choice()),
            Some(v) => Self::CHOICES
                .iter()
                .find(|(n, _)| *n == v)
                .map(|(_, c)| *c)
                .ok_or_else(|| format!("{}={v:?}: expected one of {}", Self::VAR, Self::expected())),
        }
    }

    /// The variable, read once per process; a variant this build cannot run is an error.
    fn from_var() -> Result<Self> {
        let choice = Self::cell().get_or_init(|| Self::parse(std::env::var(Self::VAR).ok().as_deref()));
        match choice {
            Ok(c) => match c.unavailable() {
                Some(why) => bail!("{}={} {why}", Self::VAR, c.spelling()),
                None => Ok(*c),
            },
            Err(e) => bail!("{e}"),
        }
    }
}
