//! Bootstrapping a secured cluster: a private CA, the coordinator's server certificate, a client
//! certificate for daemons (mutual TLS), and tokens. Private keys and tokens are written with mode
//! 0600; tokens files keep only hashes.
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::auth::{new_token, token_hash, Role, TokenEntry, TokenFile};

/// Writes `text` to `path` readable by the owner only (atomically: a temporary file, then rename).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Certificates signed by a fresh CA: (ca_pem, [(cert_pem, key_pem)] for server then client).
pub struct Issued {
    pub ca_pem: String,
    pub server: (String, String),
    pub worker: (String, String),
    /// Per-node daemon certificates (node name, (cert, key)): the node name is the certificate's
    /// DNS name, which binds the daemon's identity (`auth::cert_node`).
    pub nodes: Vec<(String, (String, String))>,
}

/// A CA, a server certificate for `hosts` (plus localhost and 127.0.0.1) and a daemon client
/// certificate, all in memory.
pub fn issue(hosts: &[String]) -> anyhow::Result<Issued> {
    issue_with_nodes(hosts, &[])
}

/// [`issue`], plus a client certificate bound to each node of `nodes`.
pub fn issue_with_nodes(hosts: &[String], nodes: &[String]) -> anyhow::Result<Issued> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "bt cluster CA");
    ca_params.distinguished_name = dn;
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut sp = CertificateParams::new(names)?;
    sp.distinguished_name = DistinguishedName::new();
    sp.distinguished_name
        .push(DnType::CommonName, "bt-coordinator");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let sk = KeyPair::generate()?;
    let server = sp.signed_by(&sk, &ca, &ca_key)?;

    let client = |name: &str| -> anyhow::Result<(String, String)> {
        let mut wp = CertificateParams::new(vec![name.to_string()])?;
        wp.distinguished_name = DistinguishedName::new();
        wp.distinguished_name.push(DnType::CommonName, name);
        wp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let wk = KeyPair::generate()?;
        let cert = wp.signed_by(&wk, &ca, &ca_key)?;
        Ok((cert.pem(), wk.serialize_pem()))
    };
    let worker = client(crate::auth::FLEET_CERT_NAME)?;
    let mut per_node = Vec::with_capacity(nodes.len());
    for n in nodes {
        if n == crate::auth::FLEET_CERT_NAME || n.trim().is_empty() {
            bail!("--node {n:?}: not a node name");
        }
        per_node.push((n.clone(), client(n)?));
    }
    Ok(Issued {
        ca_pem: ca.pem(),
        server: (server.pem(), sk.serialize_pem()),
        worker,
        nodes: per_node,
    })
}

/// `bt-coordinator init-secrets`: everything a secured cluster needs, in `dir`.
/// `nodes`: also a client certificate per node (`node-NAME.pem`/`.key`) that binds its daemon to
/// that node name.
pub fn init_secrets(
    dir: &Path,
    hosts: &[String],
    nodes: &[String],
    force: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = [
        "ca.pem",
        "server.pem",
        "server.key",
        "worker.pem",
        "worker.key",
        "tokens.toml",
        "admin.token",
        "worker.token",
    ];
    if !force {
        if let Some(n) = names.iter().find(|n| dir.join(n).exists()) {
            bail!(
                "{} exists; pass --force to replace every secret in {}",
                dir.join(n).display(),
                dir.display()
            );
        }
    }
    let issued = issue_with_nodes(hosts, nodes)?;
    for (n, (cert, key)) in &issued.nodes {
        write_public(&dir.join(format!("node-{n}.pem")), cert)?;
        write_private(&dir.join(format!("node-{n}.key")), key)?;
    }
    write_public(&dir.join("ca.pem"), &issued.ca_pem)?;
    write_public(&dir.join("server.pem"), &issued.server.0)?;
    write_private(&dir.join("server.key"), &issued.server.1)?;
    write_public(&dir.join("worker.pem"), &issued.worker.0)?;
    write_private(&dir.join("worker.key"), &issued.worker.1)?;
    let (admin, worker) = (new_token(), new_token());
    let file = TokenFile {
        tokens: vec![
            TokenEntry {
                name: "admin".into(),
                role: Role::Admin,
                sha256: token_hash(&admin),
                node: None,
            },
            TokenEntry {
                name: "worker".into(),
                role: Role::Worker,
                sha256: token_hash(&worker),
                node: None,
            },
        ],
    };
    write_private(&dir.join("tokens.toml"), &file.to_toml())?;
    write_private(&dir.join("admin.token"), &format!("{admin}\n"))?;
    write_private(&dir.join("worker.token"), &format!("{worker}\n"))?;
    println!(
        "secrets in {d}: CA ca.pem; server certificate server.pem/server.key; daemon client \
         certificate worker.pem/worker.key; tokens.toml (hashes) with the admin token in \
         admin.token and the worker token in worker.token",
        d = dir.display()
    );
    Ok(())
}

/// Adds a new token for `name` to the tokens file (created if missing); returns the token.
/// `node`: a worker token bound to that node (it may register only as it).
pub fn add_token(
    tokens_file: &Path,
    name: &str,
    role: Role,
    node: Option<&str>,
) -> anyhow::Result<String> {
    if name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    if node.is_some() && role != Role::Worker {
        bail!("--node binds a worker token to a node; it needs --role worker");
    }
    let mut file: TokenFile = match std::fs::read_to_string(tokens_file) {
        Ok(text) => {
            // Validate the whole file first (errors name the entry).
            crate::auth::TokenSet::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tokens_file.display()))?;
            toml::from_str(&text).with_context(|| tokens_file.display().to_string())?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile::default(),
        Err(e) => return Err(e).with_context(|| tokens_file.display().to_string()),
    };
    if file.tokens.iter().any(|t| t.name == name) {
        bail!(
            "{} already has a token named {name:?}",
            tokens_file.display()
        );
    }
    let token = new_token();
    file.tokens.push(TokenEntry {
        name: name.to_string(),
        role,
        sha256: token_hash(&token),
        node: node.map(str::to_string),
    });
    write_private(tokens_file, &file.to_toml())?;
    Ok(token)
}
