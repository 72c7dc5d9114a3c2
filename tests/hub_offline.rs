//! `HubOptions::from_env` + `resolve` with the real environment variables: `HF_HOME` pointing at
//! a temporary Hub cache and `HF_HUB_OFFLINE=1`. One test in this binary, so setting the
//! process environment races with nothing.

use kdllm::hub::{resolve, HubOptions};

#[test]
fn hf_home_and_hf_hub_offline_from_the_environment_resolve_from_the_cache() {
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    let home = tempfile::tempdir().unwrap();
    let repo_dir = home.path().join("hub/models--owner--tiny");
    let snap = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::write(snap.join(f), "{}").unwrap();
    }

    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    for unset in ["HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT"] {
        std::env::remove_var(unset);
    }

    let opts = HubOptions::from_env().unwrap();
    assert!(opts.offline);
    assert_eq!(opts.cache_dir, home.path().join("hub"));
    let files = resolve("owner/tiny", None, &opts).unwrap();
    assert_eq!(files.dir, snap);
    assert_eq!(files.revision.as_deref(), Some(COMMIT));

    // Offline means no network: a repo that is not cached fails at once with the fetch command.
    let err = resolve("owner/absent", None, &opts).unwrap_err().to_string();
    assert!(err.contains("huggingface-cli download owner/absent --revision main"), "{err}");
}
