//! kmsctl's commands: build the client from the global options, run one RPC (or the PKI
//! generator), and turn the result into a `Report`.

use std::{io::Read, path::Path, time::Duration};

use anyhow::{anyhow, bail, Context};
use kms_client::{pki, KmsClient, KmsClientConfig, Zeroizing};
use serde_json::json;

use crate::{
    audit::{self, verify_offline},
    audit_cli::AuditCommand,
    cli::{
        to_context, Cli, Command, DatakeyCommand, DecryptArgs, EncryptArgs, KeyCommand, PkiCommand,
        ReEncryptArgs,
    },
    output::{b64, from_b64, key_fields, Report},
};

/// Runs the command named on the command line.
pub async fn run(cli: &Cli) -> anyhow::Result<Report> {
    match &cli.command {
        Command::Pki(PkiCommand::Init { dir, clients }) => {
            return pki_init(dir, &cli.server_names, clients);
        }
        Command::Pki(PkiCommand::IssueClient { dir, name, uri }) => {
            return pki_issue_client(dir, name, uri);
        }
        // Offline: no connection, not even the TLS material.
        Command::Audit(AuditCommand::Verify(args)) if !args.server => {
            return verify_offline(args, cli.json);
        }
        _ => {}
    }
    let kms = connect(cli)?;
    match &cli.command {
        Command::Key(command) => key(&kms, command).await,
        Command::Datakey(DatakeyCommand::Generate {
            key_ref,
            context,
            no_plaintext,
        }) => {
            let context = context.to_context().map_err(|e| anyhow!(e))?;
            if *no_plaintext {
                let wrapped = kms
                    .generate_data_key_without_plaintext(key_ref, &context)
                    .await?;
                Ok(Report::Fields(vec![
                    ("key_id", json!(wrapped.key_id)),
                    ("key_version", json!(wrapped.key_version)),
                    ("ciphertext_blob", json!(b64(&wrapped.ciphertext_blob))),
                ]))
            } else {
                let data_key = kms.generate_data_key(key_ref, &context).await?;
                let plaintext = Zeroizing::new(b64(&data_key.plaintext));
                Ok(Report::Fields(vec![
                    ("key_id", json!(data_key.key_id)),
                    ("key_version", json!(data_key.key_version)),
                    ("ciphertext_blob", json!(b64(&data_key.ciphertext_blob))),
                    ("plaintext", json!(plaintext.as_str())),
                ]))
            }
        }
        Command::WhoAmI => {
            let me = kms.who_am_i().await?;
            if cli.json {
                return Ok(Report::Fields(vec![
                    ("identity", json!(me.identity)),
                    ("key_fingerprint", json!(me.key_fingerprint)),
                    ("roles", json!(me.roles)),
                    ("permissions", json!(me.permissions)),
                ]));
            }
            let roles = if me.roles.is_empty() {
                "(none)".to_string()
            } else {
                me.roles.join(", ")
            };
            let mut text = format!(
                "identity:        {}\nkey_fingerprint: {}\nroles:           {roles}\npermissions:\n",
                me.identity, me.key_fingerprint
            );
            if me.permissions.is_empty() {
                text.push_str("  (none: every request is denied)\n");
            }
            for p in &me.permissions {
                text.push_str(&format!("  {p}\n"));
            }
            Ok(Report::Rendered {
                text,
                success: true,
            })
        }
        Command::Encrypt(args) => encrypt(&kms, args).await,
        Command::Decrypt(args) => decrypt(&kms, args, cli.json).await,
        Command::ReEncrypt(args) => re_encrypt(&kms, args).await,
        Command::Audit(command) => audit::run(&kms.audit(), command, cli.json).await,
        Command::Pki(_) => bail!("unreachable: pki handled above"),
    }
}

/// The client, from the global options. The key file is read into zeroizing memory.
fn connect(cli: &Cli) -> anyhow::Result<KmsClient> {
    let need = |path: &Option<std::path::PathBuf>, flag: &str, env: &str| {
        path.clone()
            .ok_or_else(|| anyhow!("missing --{flag} (or {env}): mutual TLS needs it"))
    };
    let ca = need(&cli.ca_file, "ca", "KMSCTL_CA")?;
    let cert = need(&cli.cert_file, "cert", "KMSCTL_CERT")?;
    let key = need(&cli.key_file, "key", "KMSCTL_KEY")?;
    let endpoints: Vec<String> = cli
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let mut config = KmsClientConfig::from_files(endpoints, ca, cert, key)?;
    config.server_name = match cli.server_names.as_slice() {
        [] => None,
        [name] if name.is_empty() => None,
        [name] => Some(name.clone()),
        _ => bail!("--server-name given more than once; RPC commands verify a single name"),
    };
    if cli.timeout_ms == 0 {
        bail!("--timeout-ms must be greater than 0");
    }
    config.request_timeout = Duration::from_millis(cli.timeout_ms);
    Ok(KmsClient::new(&config)?)
}

async fn key(kms: &KmsClient, command: &KeyCommand) -> anyhow::Result<Report> {
    let key = match command {
        KeyCommand::Create {
            alias,
            description,
            rotation_days,
        } => {
            kms.create_key_with_rotation(
                alias.as_deref(),
                description.as_deref(),
                rotation_days.saturating_mul(86_400),
            )
            .await?
        }
        KeyCommand::Rotate(k) => {
            let (key, version) = kms.rotate_key(&k.key_ref).await?;
            let mut fields = key_fields(&key);
            fields.push(("new_version", json!(version.version)));
            return Ok(Report::Fields(fields));
        }
        KeyCommand::Versions(k) => {
            return Ok(Report::Versions(kms.list_key_versions(&k.key_ref).await?));
        }
        KeyCommand::EnableVersion(v) | KeyCommand::DisableVersion(v) => {
            let enable = matches!(command, KeyCommand::EnableVersion(_));
            let version = kms
                .set_key_version_enabled(&v.key_ref, v.version, enable)
                .await?;
            return Ok(Report::Fields(vec![
                ("key_id", json!(version.key_id)),
                ("version", json!(version.version)),
                ("state", json!(version.state.as_str())),
                ("primary", json!(version.primary)),
            ]));
        }
        KeyCommand::SetRotation {
            key_ref,
            period,
            days,
        } => {
            let secs = if *days {
                period.saturating_mul(86_400)
            } else {
                *period
            };
            kms.set_key_rotation_period(key_ref, secs).await?
        }
        KeyCommand::SetMinVersion(v) => {
            kms.set_min_decryption_version(&v.key_ref, v.version)
                .await?
        }
        KeyCommand::ScheduleDeletion {
            key_ref,
            days,
            seconds,
        } => {
            let secs = seconds.unwrap_or(days.saturating_mul(86_400));
            kms.schedule_key_deletion(key_ref, secs).await?
        }
        KeyCommand::CancelDeletion(k) => kms.cancel_key_deletion(&k.key_ref).await?,
        KeyCommand::Describe(k) => kms.describe_key(&k.key_ref).await?,
        KeyCommand::Enable(k) => kms.enable_key(&k.key_ref).await?,
        KeyCommand::Disable(k) => kms.disable_key(&k.key_ref).await?,
        KeyCommand::List { page_size } => {
            return Ok(Report::Keys(kms.list_all_keys(*page_size).await?));
        }
    };
    Ok(Report::Fields(key_fields(&key)))
}

async fn encrypt(kms: &KmsClient, args: &EncryptArgs) -> anyhow::Result<Report> {
    let context = args.context.to_context().map_err(|e| anyhow!(e))?;
    let plaintext: Zeroizing<Vec<u8>> = match (&args.plaintext, &args.input_file) {
        (Some(text), _) => Zeroizing::new(text.as_bytes().to_vec()),
        (None, Some(path)) => read_input(path)?,
        (None, None) => bail!("give --plaintext or --in"),
    };
    let blob = kms.encrypt(&args.key_ref, &plaintext, &context).await?;
    Ok(Report::Fields(vec![
        ("key_id", json!(blob.key_id)),
        ("key_version", json!(blob.key_version)),
        ("ciphertext_blob", json!(b64(&blob.ciphertext_blob))),
    ]))
}

/// Reads a file, or stdin for `-`, into zeroizing memory.
fn read_input(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut buffer = Zeroizing::new(Vec::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut buffer)
            .context("cannot read stdin")?;
    } else {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.read_to_end(&mut buffer)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(buffer)
}

async fn decrypt(kms: &KmsClient, args: &DecryptArgs, as_json: bool) -> anyhow::Result<Report> {
    let context = args.context.to_context().map_err(|e| anyhow!(e))?;
    let blob = from_b64("--blob", &args.blob)?;
    let decrypted = kms.decrypt(&blob, &context, args.audit.to_audit()).await?;
    let text = std::str::from_utf8(&decrypted.plaintext)
        .ok()
        .filter(|_| !as_json);
    let (encoding, shown) = match text {
        Some(text) => ("utf8", Zeroizing::new(text.to_string())),
        None => ("base64", Zeroizing::new(b64(&decrypted.plaintext))),
    };
    Ok(Report::Fields(vec![
        ("key_id", json!(decrypted.key_id)),
        ("key_version", json!(decrypted.key_version)),
        ("plaintext_encoding", json!(encoding)),
        ("plaintext", json!(shown.as_str())),
    ]))
}

async fn re_encrypt(kms: &KmsClient, args: &ReEncryptArgs) -> anyhow::Result<Report> {
    let context = args.context.to_context().map_err(|e| anyhow!(e))?;
    let blob = from_b64("--blob", &args.blob)?;
    let destination_context = if args.to_context.is_empty() {
        None
    } else {
        Some(to_context(&args.to_context).map_err(|e| anyhow!(e))?)
    };
    let re = kms
        .re_encrypt(
            &blob,
            &context,
            args.to_key.as_deref(),
            destination_context.as_ref(),
            args.audit.to_audit(),
        )
        .await?;
    Ok(Report::Fields(vec![
        ("key_id", json!(re.key_id)),
        ("key_version", json!(re.key_version)),
        ("source_key_id", json!(re.source_key_id)),
        ("source_key_version", json!(re.source_key_version)),
        ("ciphertext_blob", json!(b64(&re.ciphertext_blob))),
    ]))
}

fn pki_init(dir: &Path, server_names: &[String], clients: &[String]) -> anyhow::Result<Report> {
    if server_names.iter().any(String::is_empty) {
        bail!("--server-name must not be empty for pki init");
    }
    let report = pki::init_dev_pki(dir, server_names, clients)?;
    let paths = |list: &[std::path::PathBuf]| {
        json!(list
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>())
    };
    Ok(Report::Fields(vec![
        ("dir", json!(report.dir.display().to_string())),
        ("created", paths(&report.created)),
        ("kept", paths(&report.kept)),
        ("warnings", json!(report.warnings)),
    ]))
}

fn pki_issue_client(dir: &Path, name: &str, uri: &str) -> anyhow::Result<Report> {
    let name_ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && !matches!(name, "ca" | "server")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        bail!("invalid --name {name:?}: 1-64 characters of A-Z a-z 0-9 . _ -, not ca or server");
    }
    if !uri.contains("://") {
        bail!("invalid --uri {uri:?}: expected a URI such as spiffe://dev.clinic/site/a/app");
    }
    let ca = pki::CertAuthority::load(&dir.join("ca.pem"), &dir.join("ca.key"))
        .context("loading the CA (run `kmsctl pki init` first)")?;
    let (pem, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let status = match (pem.exists(), key.exists()) {
        (true, true) => {
            let existing =
                std::fs::read(&pem).with_context(|| format!("reading {}", pem.display()))?;
            if !ca.has_issued(&existing) || !cert_uris(&existing)?.iter().any(|u| u == uri) {
                bail!(
                    "{} exists but was not issued by this CA with URI {uri}; delete it and its \
                     .key to reissue",
                    pem.display()
                );
            }
            "kept"
        }
        (false, false) => {
            let now = time::OffsetDateTime::now_utc();
            ca.issue_client_cert(
                name,
                Some(uri),
                now - time::Duration::hours(1),
                now + pki::LEAF_VALIDITY,
            )?
            .write(&pem, &key)?;
            "created"
        }
        _ => bail!(
            "only one of {} and {} exists; delete it",
            pem.display(),
            key.display()
        ),
    };
    Ok(Report::Fields(vec![
        ("status", json!(status)),
        ("cert", json!(pem.display().to_string())),
        ("key", json!(key.display().to_string())),
        ("uri", json!(uri)),
    ]))
}

/// The SAN URIs of the (first) certificate in a PEM file.
fn cert_uris(pem: &[u8]) -> anyhow::Result<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow!("not a valid certificate: {e}"))?;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect())
}
