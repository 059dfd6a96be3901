//! `saga-streams completions` and `saga-streams man`: shell completions and man pages generated
//! from the command line definition itself, so they never fall behind it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams completions bash > /etc/bash_completion.d/saga-streams\n  \
saga-streams completions zsh > \"${fpath[1]}/_saga-streams\""
)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  saga-streams man | man -l -\n  \
saga-streams man --out /usr/local/share/man/man1")]
pub struct ManArgs {
    /// Write `saga-streams.1` and one page per command (`saga-streams-run.1`, ...) into this
    /// directory, instead of printing the main page.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The command line as users see it (every flag with its environment variable).
fn command() -> clap::Command {
    super::config::with_env_vars(super::Cli::command())
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "saga-streams", &mut script);
    let mut script = String::from_utf8_lossy(&script).into_owned();
    if args.shell == clap_complete::Shell::Bash {
        // clap_complete's bash script spells the state of a subcommand of a hyphenated binary
        // two ways (`saga__streams__subcmd__run` where it walks the words, and
        // `saga__subcmd__streams__subcmd__run` in the case arms: clap-rs/clap#6421), so no
        // subcommand's flags would complete. The arms are spelled as the walk spells them.
        script = script.replace("saga__subcmd__streams", "saga__streams");
    }
    print!("{script}");
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let cmd = command();
    match args.out {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            eprintln!("wrote the man pages into {}", dir.display());
        }
        None => {
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .context("cannot write the man page")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
