//! Where the bytes of files live (PROTOCOL v2 "Files"): the clients move
//! them with URLs that stop working after a while; imflow only hands out
//! the URLs and checks that an upload arrived.
//!
//! - [`LocalFiles`] (standalone): files under the data directory; the URLs
//!   are paths on the API's own origin, signed with a key kept in the
//!   store (HMAC-SHA256 over the operation, the file and the expiry), and
//!   the API serves them.
//! - [`S3Files`] (cluster): any S3-compatible object store (garage on
//!   loopback in the tests, as MinIO sat in the seed); the URLs are
//!   presigned S3 URLs the clients use directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use object_store::signer::Signer;
use object_store::ObjectStore;
use sha2::Sha256;
use tokio::io::AsyncWriteExt;

use super::{Directory, FileRow};
use crate::error::{Error, Result};
use crate::model::ImError;

/// Object storage as the API uses it.
#[async_trait]
pub trait Files: Send + Sync + 'static {
    /// Where the client PUTs the bytes of `file_id`, valid for `ttl`.
    async fn upload_url(&self, file_id: &str, ttl: Duration) -> Result<String>;
    /// Where a reader GETs `file`, valid for `ttl`.
    async fn download_url(&self, file: &FileRow, ttl: Duration) -> Result<String>;
    /// How many bytes of `file_id` are stored, if any.
    async fn stored_size(&self, file_id: &str) -> Result<Option<u64>>;
    /// Delete the bytes of `file_id` (gone already: fine).
    async fn delete(&self, file_id: &str) -> Result<()>;
    /// The embedded store, whose URLs the API itself serves.
    fn local(&self) -> Option<&LocalFiles> {
        None
    }
}

/// A new file id: random, so one user cannot guess another's.
pub fn new_file_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether `id` has the shape [`new_file_id`] gives (safe in a path).
pub fn valid_file_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Files under a directory of this host, for standalone mode.
pub struct LocalFiles {
    dir: PathBuf,
    directory: Arc<dyn Directory>,
    key: tokio::sync::OnceCell<Vec<u8>>,
}

/// Why an upload to [`LocalFiles`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the body is longer than the {0} bytes declared")]
    TooLong(u64),
    #[error("the body has {got} bytes; {declared} were declared")]
    TooShort { got: u64, declared: u64 },
    #[error("reading the body: {0}")]
    Body(String),
    #[error("the file is already uploaded")]
    AlreadyStored,
    #[error(transparent)]
    Store(#[from] Error),
}

impl LocalFiles {
    /// Files under `dir`; the URL key is kept in `directory`'s settings.
    pub fn new(dir: PathBuf, directory: Arc<dyn Directory>) -> Self {
        LocalFiles {
            dir,
            directory,
            key: tokio::sync::OnceCell::new(),
        }
    }

    /// The signing key: made once per data directory, so URLs survive a
    /// restart until they expire.
    async fn key(&self) -> Result<&[u8]> {
        self.key
            .get_or_try_init(|| async {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| {
                    Error::Backend(format!("no randomness for the file URL key: {e}"))
                })?;
                let fresh = hex::encode(key);
                let kept = self
                    .directory
                    .setting_or_insert("file_url_key", &fresh)
                    .await?;
                Ok::<_, Error>(kept.into_bytes())
            })
            .await
            .map(Vec::as_slice)
    }

    fn mac(key: &[u8], op: &str, file_id: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(format!("{op}\n{file_id}\n{expires}").as_bytes());
        mac
    }

    async fn signed(&self, op: &str, file_id: &str, ttl: Duration) -> Result<String> {
        let expires = crate::model::now_ms() + ttl.as_millis() as i64;
        let sig = hex::encode(
            Self::mac(self.key().await?, op, file_id, expires)
                .finalize()
                .into_bytes(),
        );
        Ok(format!(
            "/files/{file_id}/content?expires={expires}&sig={sig}"
        ))
    }

    /// Whether `sig` signs `op` (`put` or `get`) on `file_id` until
    /// `expires` (ms), and that time has not passed.
    pub async fn verify(&self, op: &str, file_id: &str, expires: i64, sig: &str) -> Result<bool> {
        if expires < crate::model::now_ms() {
            return Ok(false);
        }
        let Ok(sig) = hex::decode(sig) else {
            return Ok(false);
        };
        Ok(Self::mac(self.key().await?, op, file_id, expires)
            .verify_slice(&sig)
            .is_ok())
    }

    /// Where `file_id`'s bytes are (its id checked by the caller).
    pub fn path(&self, file_id: &str) -> PathBuf {
        self.dir.join(file_id)
    }

    /// Store the bytes of `file` from `body`, which must be exactly its
    /// declared size. They go to a file of this upload's own, which takes
    /// the file's name only if no other upload got there first; an upload
    /// cut short (a refused body, a timeout dropping this future) leaves
    /// nothing behind.
    pub async fn store<S, E>(
        &self,
        file: &FileRow,
        mut body: S,
    ) -> std::result::Result<(), UploadError>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let io = |e: std::io::Error| {
            UploadError::Store(Error::Open {
                path: self.dir.display().to_string(),
                source: e,
            })
        };
        tokio::fs::create_dir_all(&self.dir).await.map_err(io)?;
        let part = Part(
            self.dir
                .join(format!("{}.{}.part", file.file_id, new_file_id())),
        );
        let mut out = tokio::fs::File::create(&part.0).await.map_err(io)?;
        let mut got = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
            got += chunk.len() as u64;
            if got > file.size {
                return Err(UploadError::TooLong(file.size));
            }
            out.write_all(&chunk).await.map_err(io)?;
        }
        if got < file.size {
            return Err(UploadError::TooShort {
                got,
                declared: file.size,
            });
        }
        out.sync_all().await.map_err(io)?;
        // A link fails if the name exists: of two uploads, one wins.
        match tokio::fs::hard_link(&part.0, self.path(&file.file_id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(UploadError::AlreadyStored)
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// An upload's own file, removed when dropped (what it held is either
/// linked under the file's name by then, or not wanted).
struct Part(PathBuf);

impl Drop for Part {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[async_trait]
impl Files for LocalFiles {
    async fn upload_url(&self, file_id: &str, ttl: Duration) -> Result<String> {
        self.signed("put", file_id, ttl).await
    }

    async fn download_url(&self, file: &FileRow, ttl: Duration) -> Result<String> {
        self.signed("get", &file.file_id, ttl).await
    }

    async fn stored_size(&self, file_id: &str) -> Result<Option<u64>> {
        match tokio::fs::metadata(self.path(file_id)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Open {
                path: self.path(file_id).display().to_string(),
                source,
            }),
        }
    }

    async fn delete(&self, file_id: &str) -> Result<()> {
        match tokio::fs::remove_file(self.path(file_id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Open {
                path: self.path(file_id).display().to_string(),
                source,
            }),
        }
    }

    fn local(&self) -> Option<&LocalFiles> {
        Some(self)
    }
}

/// Where the cluster's object store is.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// The S3 API as imflow's processes reach it (`http://127.0.0.1:10005`).
    pub endpoint: String,
    /// The S3 API as clients reach it, when that differs (behind nginx):
    /// the URLs handed out are signed for this one.
    pub public_endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Files in an S3-compatible object store.
pub struct S3Files {
    store: object_store::aws::AmazonS3,
    /// Signs URLs for the clients' endpoint.
    signer: object_store::aws::AmazonS3,
    what: String,
}

impl S3Files {
    pub fn new(s: &S3Settings) -> Result<Self> {
        let build = |endpoint: &str| {
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(endpoint)
                .with_region(&s.region)
                .with_bucket_name(&s.bucket)
                .with_access_key_id(&s.access_key_id)
                .with_secret_access_key(&s.secret_access_key)
                .with_allow_http(true)
                .with_virtual_hosted_style_request(false)
                .build()
                .map_err(|e| {
                    Error::Backend(format!(
                        "s3 (endpoint {endpoint}, bucket {}): {e}",
                        s.bucket
                    ))
                })
        };
        Ok(S3Files {
            store: build(&s.endpoint)?,
            signer: build(s.public_endpoint.as_deref().unwrap_or(&s.endpoint))?,
            what: format!("s3 {} bucket {}", s.endpoint, s.bucket),
        })
    }

    fn path(file_id: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("files/{file_id}"))
    }

    fn failed(&self, e: object_store::Error) -> Error {
        Error::Backend(format!("{}: {e}", self.what))
    }
}

#[async_trait]
impl Files for S3Files {
    async fn upload_url(&self, file_id: &str, ttl: Duration) -> Result<String> {
        let url = self
            .signer
            .signed_url(reqwest::Method::PUT, &Self::path(file_id), ttl)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(url.to_string())
    }

    async fn download_url(&self, file: &FileRow, ttl: Duration) -> Result<String> {
        let url = self
            .signer
            .signed_url(reqwest::Method::GET, &Self::path(&file.file_id), ttl)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(url.to_string())
    }

    async fn stored_size(&self, file_id: &str) -> Result<Option<u64>> {
        match self.store.head(&Self::path(file_id)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(e)),
        }
    }

    async fn delete(&self, file_id: &str) -> Result<()> {
        match self.store.delete(&Self::path(file_id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }
}

/// A cluster without object storage configured: files are refused with a
/// sentence saying what to set.
pub struct NoFiles;

impl NoFiles {
    fn refuse<T>() -> Result<T> {
        Err(Error::Client(ImError::unavailable(
            "files are not configured on this server: the operator sets `s3` in config.yaml",
        )))
    }
}

#[async_trait]
impl Files for NoFiles {
    async fn upload_url(&self, _: &str, _: Duration) -> Result<String> {
        Self::refuse()
    }
    async fn download_url(&self, _: &FileRow, _: Duration) -> Result<String> {
        Self::refuse()
    }
    async fn stored_size(&self, _: &str) -> Result<Option<u64>> {
        Self::refuse()
    }
    async fn delete(&self, _: &str) -> Result<()> {
        Ok(())
    }
}

/// The embedded store's files directory under a data directory.
pub fn local_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("files")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_url_works_for_its_operation_and_file_until_it_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SqliteStore::open(dir.path(), Default::default())
            .await
            .expect("store");
        let files = LocalFiles::new(local_dir(dir.path()), store);
        let id = new_file_id();
        assert!(valid_file_id(&id));
        let url = files
            .upload_url(&id, Duration::from_secs(60))
            .await
            .expect("url");
        let query: std::collections::HashMap<String, String> = url
            .split_once('?')
            .expect("query")
            .1
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let expires: i64 = query["expires"].parse().expect("expires");
        let sig = &query["sig"];
        assert!(files
            .verify("put", &id, expires, sig)
            .await
            .expect("verify"));
        assert!(!files
            .verify("get", &id, expires, sig)
            .await
            .expect("verify"));
        assert!(!files
            .verify("put", &new_file_id(), expires, sig)
            .await
            .expect("verify"));
        assert!(!files
            .verify("put", &id, expires + 1, sig)
            .await
            .expect("verify"));
        assert!(!files.verify("put", &id, 1, sig).await.expect("verify"));
        // Signed right, but past its time.
        let past = crate::model::now_ms() - 1;
        let key = files.key().await.expect("key").to_vec();
        let stale = hex::encode(
            LocalFiles::mac(&key, "put", &id, past)
                .finalize()
                .into_bytes(),
        );
        assert!(!files
            .verify("put", &id, past, &stale)
            .await
            .expect("verify"));
        let fresh = hex::encode(
            LocalFiles::mac(&key, "put", &id, past + 60_000)
                .finalize()
                .into_bytes(),
        );
        assert!(files
            .verify("put", &id, past + 60_000, &fresh)
            .await
            .expect("verify"));
    }

    #[tokio::test]
    async fn an_upload_is_kept_only_when_it_has_exactly_the_declared_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SqliteStore::open(dir.path(), Default::default())
            .await
            .expect("store");
        let files = LocalFiles::new(local_dir(dir.path()), store);
        let file = FileRow {
            file_id: new_file_id(),
            owner: "a".into(),
            name: "n".into(),
            size: 5,
            content_type: "text/plain".into(),
            created_at: 0,
            complete: false,
        };
        let body = |parts: &[&'static str]| {
            futures::stream::iter(
                parts
                    .iter()
                    .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p.as_bytes())))
                    .collect::<Vec<_>>(),
            )
        };
        assert!(matches!(
            files.store(&file, body(&["abc", "def"])).await,
            Err(UploadError::TooLong(5))
        ));
        assert!(matches!(
            files.store(&file, body(&["abc"])).await,
            Err(UploadError::TooShort { got: 3, .. })
        ));
        assert_eq!(files.stored_size(&file.file_id).await.expect("size"), None);
        files
            .store(&file, body(&["ab", "cde"]))
            .await
            .expect("stored");
        assert_eq!(
            files.stored_size(&file.file_id).await.expect("size"),
            Some(5)
        );
        assert!(matches!(
            files.store(&file, body(&["vwxyz"])).await,
            Err(UploadError::AlreadyStored)
        ));
        let left: Vec<_> = std::fs::read_dir(local_dir(dir.path()))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(left, vec![file.file_id.clone()], "no part file left behind");
    }
}
