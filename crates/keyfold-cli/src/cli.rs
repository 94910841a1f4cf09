//! The command line, as clap sees it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
Examples:
  keyfold kek generate --out /etc/keyfold/kek.hex
  keyfold inspect record.bin
  keyfold --config ops.json keyring create acme
  keyfold --config ops.json keyring rotate acme
  keyfold --config ops.json --json keyring show acme
  keyfold --config ops.json probe
  keyfold --config ops.json rewrap run --job job.json

Exit codes:
  0 success          1 error               2 usage or configuration
  3 not a keyfold ciphertext               4 refused (confirmation, existing file)
  5 not found        6 lifecycle refused   7 KMS failure
  8 done, but the audit log could not be written
  130 interrupted (a rewrap stopped after its batch, checkpoint saved)";

/// keyfold: envelope encryption under each tenant's own KMS key, for operators.
#[derive(Debug, Parser)]
#[command(name = "keyfold", version, about, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    /// Machine-readable output: one JSON document on stdout (errors too).
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// The operator's config file (JSON: `store`, `kms`, `audit_log`).
    #[arg(long, global = true, env = "KEYFOLD_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// The keyring store, overriding the config's: `file://DIR`.
    #[arg(long, global = true, env = "KEYFOLD_STORE", value_name = "URL")]
    pub(crate) store: Option<String>,

    /// Where audit events go, as JSON lines: a file (appended) or `-` for
    /// stderr. Overrides the config's `audit_log`; default stderr.
    #[arg(long, global = true, value_name = "FILE|-")]
    pub(crate) audit_log: Option<String>,

    /// The operator named in audit events (default: $KEYFOLD_ACTOR, then $USER).
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) actor: Option<String>,

    /// Do not ask for confirmation before a destructive change.
    #[arg(long, short = 'y', global = true)]
    pub(crate) yes: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Local key-encryption keys (development, tests, self-hosting).
    #[command(subcommand)]
    Kek(KekCommand),

    /// What a record or stream header says, without any key.
    #[command(after_help = "\
Examples:
  keyfold inspect record.bin
  keyfold --json inspect - < object.kf
  psql -Atc \"select ciphertext from t where id = 1\" | xxd -r -p | keyfold inspect -")]
    Inspect {
        /// The ciphertext file, or `-` for stdin.
        #[arg(default_value = "-", value_name = "FILE|-")]
        file: String,
    },

    /// A keyring's versions and lifecycle (needs a store and, for changes, a KMS).
    #[command(subcommand)]
    Keyring(KeyringCommand),

    /// The onboarding probe: validate the KMS config, build the wrapper, and
    /// wrap + unwrap a random key, step by step. Changes nothing.
    #[command(after_help = "\
Examples:
  keyfold probe --config tenant-kms.json
  keyfold --json probe --config ops.json")]
    Probe {
        /// Audit a failure under this keyring id (default `keyfold-probe`).
        #[arg(long, value_name = "ID")]
        keyring: Option<String>,
    },

    /// Move a table's records onto the active version (rewrap job).
    #[command(subcommand)]
    Rewrap(RewrapCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum KekCommand {
    /// Writes a new random 32-byte KEK (hex) to a new owner-only file.
    #[command(after_help = "\
Example:
  keyfold kek generate --out /etc/keyfold/kek.hex
  then in the config: \"kms\": {\"provider\": \"local\", \"kms_key_ref\": \"ops-kek\", \"kek_file\": \"/etc/keyfold/kek.hex\"}")]
    Generate {
        /// The file to create; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// A keyring and one of its versions.
#[derive(Debug, Args)]
pub(crate) struct VersionArgs {
    /// The keyring (tenant) id.
    pub(crate) keyring: String,
    /// The master key version.
    pub(crate) version: u32,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeyringCommand {
    /// Versions, states and timestamps, as a KMS shows a key.
    #[command(
        after_help = "Example:\n  keyfold --store file:///var/lib/keyfold --json keyring show acme"
    )]
    Show {
        /// The keyring (tenant) id.
        keyring: String,
    },
    /// Creates a keyring and its first version (active).
    #[command(after_help = "Example:\n  keyfold --config ops.json keyring create acme")]
    Create {
        /// The keyring (tenant) id.
        keyring: String,
    },
    /// New active version; the previous one is retired (still decrypts).
    #[command(after_help = "Example:\n  keyfold --config ops.json keyring rotate acme")]
    Rotate {
        /// The keyring (tenant) id.
        keyring: String,
    },
    /// Makes a retired version active again.
    Rollback(VersionArgs),
    /// Disables a version: its records stop decrypting (reversible). Asks first.
    #[command(after_help = "Example:\n  keyfold --config ops.json keyring disable acme 1 --yes")]
    Disable(VersionArgs),
    /// Enables a disabled version again (it becomes retired).
    Enable(VersionArgs),
    /// Destroys a disabled version's key for good. Asks first.
    #[command(after_help = "\
Examples:
  keyfold --config ops.json rewrap status --job job.json --evidence-for 1 > evidence.json
  keyfold --config ops.json keyring destroy acme 1 --evidence evidence.json
  keyfold --config ops.json keyring destroy acme 1 --force --reason \"INC-42: key leaked\"")]
    Destroy {
        #[command(flatten)]
        target: VersionArgs,
        /// Evidence that no record is left on the version (JSON, from
        /// `keyfold rewrap status --evidence-for VERSION`).
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "force",
            required_unless_present = "force"
        )]
        evidence: Option<PathBuf>,
        /// Destroy without evidence; records still on the version are lost.
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why, for the audit trail (with --force).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Records when a disabled version is to be destroyed (enabling it
    /// cancels); the services' maintenance task destroys it then, once the
    /// evidence is in hand. Asks first.
    #[command(after_help = "\
Examples:
  keyfold --config ops.json keyring schedule-destroy acme 1            # as soon as allowed
  keyfold --config ops.json keyring schedule-destroy acme 1 --at 2027-01-15T09:00:00Z")]
    ScheduleDestroy {
        #[command(flatten)]
        target: VersionArgs,
        /// When (RFC 3339, UTC); default: the earliest time allowed (the
        /// grace period's end).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
    },
    /// Shows the rotation policy stored with the keyring, or sets it.
    #[command(after_help = "\
Examples:
  keyfold --config ops.json keyring policy acme                      # show
  keyfold --config ops.json keyring policy acme --period-days 90     # rotate every 90 days
  keyfold --config ops.json keyring policy acme --off                # keep, but disabled
  keyfold --config ops.json keyring policy acme --remove")]
    Policy {
        /// The keyring (tenant) id.
        keyring: String,
        /// Rotate every N days (1..=3650); enables the policy.
        #[arg(long, value_name = "N", conflicts_with = "remove")]
        period_days: Option<u32>,
        /// Keep the policy but disable it.
        #[arg(long, conflicts_with_all = ["remove", "on"])]
        off: bool,
        /// Enable the stored policy again.
        #[arg(long, conflicts_with = "remove")]
        on: bool,
        /// Remove the policy.
        #[arg(long)]
        remove: bool,
    },
    /// Disables every version below N in one audited change (records on
    /// them stop decrypting). Asks first.
    MinDecryptionVersion(VersionArgs),
    /// Seals the keyring for the whole fleet (an incident, the post-breach
    /// cycle): the seal is stored with the keyring, and every instance
    /// refuses to encrypt and decrypt once its view holds it, until
    /// `keyring unseal`. Needs no KMS. Asks first.
    #[command(after_help = "\
Examples:
  keyfold --config ops.json keyring seal acme --reason \"INC-42: API token leaked\"
  keyfold --config ops.json --json keyring seal acme --reason \"INC-42\" --yes

Every instance over the store refuses at its next use with store change
notifications (PostgreSQL, a file store's poller), within its max staleness
without. A keyring already sealed keeps its first seal (exit code 0).")]
    Seal {
        /// The keyring (tenant) id.
        keyring: String,
        /// Why, for the audit trail and every refusal (required, not blank).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Lifts an operator's seal for the whole fleet (audited), or, when the
    /// keyring has none, retries the KMS as the operator: unwraps the active
    /// version and reports whether the keyring can be used.
    #[command(after_help = "Example:\n  keyfold --config ops.json keyring unseal acme")]
    Unseal {
        /// The keyring (tenant) id.
        keyring: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum RewrapCommand {
    /// Runs (or resumes) the job until every row is on its target version.
    /// Ctrl-C stops after the current batch with the checkpoint saved.
    #[command(after_help = "\
Examples:
  keyfold --config ops.json rewrap run --job job.json
  keyfold --config ops.json --json rewrap run --job job.json --restart

job.json:
  {\"database\": \"sqlite://app.db\", \"keyring\": \"acme\",
   \"tables\": [{\"name\": \"secrets\", \"id_column\": \"id\", \"ciphertext_column\": \"ciphertext\",
               \"context\": {\"tenant\": {\"column\": \"tenant\"}, \"table\": {\"value\": \"secrets\"},
                           \"row\": {\"column\": \"id\"}}}]}")]
    Run {
        /// The job spec (JSON): database, keyring, tables and context columns.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// Start a new job even if an unfinished one exists (it is abandoned).
        #[arg(long)]
        restart: bool,
        /// Rows per batch (default: the spec's `batch_size`, else 100).
        #[arg(long, value_name = "N")]
        batch_size: Option<usize>,
        /// Pause between batches, in milliseconds (pacing; default 0).
        #[arg(long, value_name = "MS", default_value_t = 0)]
        pause_ms: u64,
    },
    /// The latest job's progress, from the job table.
    #[command(after_help = "Example:\n  keyfold rewrap status --job job.json")]
    Status {
        /// The job spec (JSON).
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// Print the evidence that no record is left on VERSION (JSON, for
        /// `keyring destroy --evidence`), when the finished job proves it.
        #[arg(long, value_name = "VERSION")]
        evidence_for: Option<u32>,
    },
}
