//! A FAKE `google.cloud.kms.v1.KeyManagementService`, hosted in the test
//! process on `127.0.0.1:0` with tonic, for tests and examples. It is not
//! Google's code and not an emulator Google ships: no gRPC Cloud KMS emulator
//! exists, so this one is written from the Cloud KMS API reference.
//!
//! Served: `Encrypt` and `Decrypt` (symmetric `ENCRYPT_DECRYPT` keys), over
//! gcloud-sdk's own message types with tonic's prost codec, so the real
//! gcloud-sdk client talks to it over a real HTTP/2 gRPC connection. Every
//! other method answers `UNIMPLEMENTED`.
//!
//! How faithful it is, against the documented behaviour of Cloud KMS:
//! - real AEAD: AES-256-GCM under a random 32-byte key per CryptoKeyVersion,
//!   random 96-bit nonce per call; the ciphertext names its version (opaque
//!   to clients, as in Cloud KMS), and the AEAD's associated data is the
//!   CryptoKey name plus the caller's `additional_authenticated_data`, so a
//!   wrong AAD, another key or any changed byte fails with
//!   `INVALID_ARGUMENT` "Decryption failed: the ciphertext is invalid.";
//! - CRC32C: `plaintext_crc32c`, `ciphertext_crc32c` and
//!   `additional_authenticated_data_crc32c` are verified when sent
//!   (`INVALID_ARGUMENT` "The checksum in field X did not match the data in
//!   field Y."), `verified_*` report it, and `ciphertext_crc32c` /
//!   `plaintext_crc32c` are always returned;
//! - versions: `Encrypt` on a CryptoKey uses its primary version and reports
//!   that version's name; `Decrypt` picks the version from the ciphertext, so
//!   old versions keep decrypting after a rotation (`used_primary` says
//!   which); a disabled or destroyed version fails with
//!   `FAILED_PRECONDITION`; an unknown key or version with `NOT_FOUND`;
//! - limits: plaintext and AAD at most 64 KiB each (`INVALID_ARGUMENT`).
//!
//! Switches the real service has no equivalent of, for tests: deny a key
//! (`PERMISSION_DENIED`), and a fault queue that answers the next calls with
//! a status (e.g. `UNAVAILABLE`, `RESOURCE_EXHAUSTED` with `RetryInfo`) or
//! corrupts a request or response on the wire.
//!
//! Not modelled: IAM roles, other key purposes and algorithms, HSM/EKM
//! protection levels, key import, `RawEncrypt`, version scheduling
//! (`DESTROY_SCHEDULED` is folded into `DESTROYED`), quotas, and the exact
//! ciphertext format of Cloud KMS.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test support shared by several test binaries; a broken fake is a test failure"
)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, Key, KeyInit, Nonce, Payload};
use gcloud_sdk::SecretValue;
use gcloud_sdk::google::cloud::kms::v1::{DecryptRequest, EncryptResponse, ProtectionLevel};
use gcloud_sdk::google::rpc::{RetryInfo, Status as RpcStatus};
use gcloud_sdk::prost::Message;
use gcloud_sdk::prost_types::{Any, Duration as PbDuration};
use gcloud_sdk::proto_ext::kms::{DecryptResponse, EncryptRequest};
use gcloud_sdk::tonic::body::Body;
use gcloud_sdk::tonic::codegen::http;
use gcloud_sdk::tonic::server::{Grpc, NamedService, UnaryService};
use gcloud_sdk::tonic::transport::server::TcpIncoming;
use gcloud_sdk::tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

const SERVICE: &str = "google.cloud.kms.v1.KeyManagementService";
const MAX_DATA: usize = 64 * 1024;
const NONCE_LEN: usize = 12;
/// Fake ciphertext: magic, version number (u32 BE), nonce, AES-GCM output.
const MAGIC: &[u8; 4] = b"FKMS";

/// Which RPC a fault or a counter is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `Encrypt`.
    Encrypt,
    /// `Decrypt`.
    Decrypt,
}

/// Something the fake does to one call instead of, or on top of, serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status code (and a `RetryInfo` detail for
    /// `RESOURCE_EXHAUSTED`, see [`FakeKms::set_retry_delay`]).
    Status(Code),
    /// Flip a bit of the request's data (plaintext or ciphertext) as it
    /// arrives, as if it changed on the wire: the service's checksum check
    /// must catch it.
    CorruptRequestData,
    /// Flip a bit of the response's data (ciphertext or plaintext) and keep
    /// the checksum of the original: the client's check must catch it.
    CorruptResponseData,
    /// Send a wrong `ciphertext_crc32c` / `plaintext_crc32c` in the response.
    CorruptResponseChecksum,
    /// Answer `Encrypt` with `verified_plaintext_crc32c = false`, as if the
    /// checksum had been lost on the way.
    UnverifiedPlaintext,
    /// Answer `Encrypt` with `verified_additional_authenticated_data_crc32c = false`.
    UnverifiedAad,
    /// Report another key's version as the one that encrypted.
    ForeignVersionName,
    /// Never answer the call (a stuck service): the client's deadline is the
    /// only way out, so a test using it cannot pass by being fast or slow.
    Stall,
}

/// The state of a CryptoKeyVersion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// Usable.
    Enabled,
    /// Refuses Encrypt and Decrypt; reversible.
    Disabled,
    /// Key material gone; terminal.
    Destroyed,
}

impl VersionState {
    fn name(self) -> &'static str {
        match self {
            VersionState::Enabled => "ENABLED",
            VersionState::Disabled => "DISABLED",
            VersionState::Destroyed => "DESTROYED",
        }
    }
}

struct Version {
    state: VersionState,
    key: Option<[u8; 32]>,
}

struct CryptoKey {
    versions: Vec<Version>,
    primary: u32,
}

/// What the fake saw of a request (no plaintext is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// The method.
    pub method: Method,
    /// `name`.
    pub name: String,
    /// `additional_authenticated_data`.
    pub aad: Vec<u8>,
    /// Whether the plaintext / ciphertext checksum was sent.
    pub data_crc32c_sent: bool,
    /// Whether the AAD checksum was sent.
    pub aad_crc32c_sent: bool,
    /// The `x-goog-request-params` routing header.
    pub routing_header: Option<String>,
    /// Whether an `authorization` header came with the call.
    pub authorization_sent: bool,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, CryptoKey>,
    denied: HashSet<String>,
    faults: VecDeque<(Method, Fault)>,
    calls: HashMap<Method, usize>,
    seen: Vec<SeenRequest>,
    retry_delay: Duration,
    stall: bool,
}

/// A running fake Cloud KMS. Dropping it stops the server.
pub struct FakeKms {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeKms {
    /// Starts the fake on `127.0.0.1` on a free port, in the current Tokio runtime.
    pub async fn start() -> FakeKms {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            retry_delay: Duration::from_millis(20),
            ..State::default()
        }));
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = KmsService {
            state: Arc::clone(&state),
        };
        tokio::spawn(async move {
            gcloud_sdk::tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        FakeKms {
            addr,
            state,
            shutdown: Some(shutdown),
        }
    }

    /// `http://127.0.0.1:PORT`, for `endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates the CryptoKey `projects/{project}/locations/{location}/keyRings/{ring}/cryptoKeys/{key}`
    /// with one enabled primary version, and returns its name.
    pub fn create_key(&self, project: &str, location: &str, ring: &str, key: &str) -> String {
        let name =
            format!("projects/{project}/locations/{location}/keyRings/{ring}/cryptoKeys/{key}");
        let mut state = self.state.lock().unwrap();
        assert!(!state.keys.contains_key(&name), "key {name} exists");
        state.keys.insert(
            name.clone(),
            CryptoKey {
                versions: vec![Version::new()],
                primary: 1,
            },
        );
        name
    }

    /// Adds a new version to `key` and makes it primary (what "rotate now"
    /// does in Cloud KMS); returns the new version's name.
    pub fn rotate(&self, key: &str) -> String {
        let mut state = self.state.lock().unwrap();
        let k = state.keys.get_mut(key).expect("unknown key");
        k.versions.push(Version::new());
        k.primary = u32::try_from(k.versions.len()).unwrap();
        format!("{key}/cryptoKeyVersions/{}", k.primary)
    }

    /// Makes `version` of `key` primary.
    pub fn set_primary(&self, key: &str, version: u32) {
        let mut state = self.state.lock().unwrap();
        let k = state.keys.get_mut(key).expect("unknown key");
        assert!(version >= 1 && version as usize <= k.versions.len());
        k.primary = version;
    }

    /// Sets the state of `version` of `key`. Destroying erases its key material.
    pub fn set_version_state(&self, key: &str, version: u32, new: VersionState) {
        let mut state = self.state.lock().unwrap();
        let k = state.keys.get_mut(key).expect("unknown key");
        let v = &mut k.versions[version as usize - 1];
        assert!(
            v.state != VersionState::Destroyed || new == VersionState::Destroyed,
            "a destroyed version stays destroyed"
        );
        v.state = new;
        if new == VersionState::Destroyed {
            v.key = None;
        }
    }

    /// Makes every call on `key` fail with `PERMISSION_DENIED` (or stop doing so).
    pub fn deny(&self, key: &str, denied: bool) {
        let mut state = self.state.lock().unwrap();
        if denied {
            state.denied.insert(key.to_owned());
        } else {
            state.denied.remove(key);
        }
    }

    /// Applies `fault` to the next `times` calls of `method`.
    pub fn inject(&self, method: Method, fault: Fault, times: usize) {
        let mut state = self.state.lock().unwrap();
        for _ in 0..times {
            state.faults.push_back((method, fault.clone()));
        }
    }

    /// The `RetryInfo` delay sent with an injected `RESOURCE_EXHAUSTED`.
    pub fn set_retry_delay(&self, delay: Duration) {
        self.state.lock().unwrap().retry_delay = delay;
    }

    /// Faults not yet used.
    pub fn pending_faults(&self) -> usize {
        self.state.lock().unwrap().faults.len()
    }

    /// Calls of `method` received so far.
    pub fn calls(&self, method: Method) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(&method)
            .copied()
            .unwrap_or(0)
    }

    /// Every request received so far, oldest first.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.lock().unwrap().seen.clone()
    }
}

impl Drop for FakeKms {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Version {
    fn new() -> Version {
        let mut key = [0u8; 32];
        keyfold_core::rng::fill(&mut key).unwrap();
        Version {
            state: VersionState::Enabled,
            key: Some(key),
        }
    }
}

fn crc(data: &[u8]) -> i64 {
    i64::from(crc32c::crc32c(data))
}

fn checksum_mismatch(field: &str, data_field: &str) -> Status {
    Status::invalid_argument(format!(
        "The checksum in field {field} did not match the data in field {data_field}."
    ))
}

fn aead_aad(key_name: &str, aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key_name.len() + aad.len());
    out.extend_from_slice(&u32::try_from(key_name.len()).unwrap().to_be_bytes());
    out.extend_from_slice(key_name.as_bytes());
    out.extend_from_slice(aad);
    out
}

fn flip_bit(data: &mut [u8]) {
    if let Some(last) = data.last_mut() {
        *last ^= 0x01;
    }
}

fn invalid_ciphertext() -> Status {
    Status::invalid_argument("Decryption failed: the ciphertext is invalid.")
}

impl State {
    /// Counts the call, records it, and takes the first pending fault for `method`.
    fn begin(&mut self, seen: SeenRequest) -> Option<Fault> {
        let method = seen.method;
        *self.calls.entry(method).or_default() += 1;
        self.seen.push(seen);
        let pos = self.faults.iter().position(|(m, _)| *m == method)?;
        let fault = self.faults.remove(pos).map(|(_, f)| f);
        if let Some(Fault::Stall) = fault {
            self.stall = true;
        }
        fault
    }

    fn status_fault(&self, code: Code) -> Status {
        if code == Code::ResourceExhausted {
            let info = RetryInfo {
                retry_delay: Some(PbDuration {
                    seconds: i64::try_from(self.retry_delay.as_secs()).unwrap(),
                    nanos: i32::try_from(self.retry_delay.subsec_nanos()).unwrap(),
                }),
            };
            let rpc = RpcStatus {
                code: code as i32,
                message: "Quota exceeded for quota metric 'Cryptographic requests'".into(),
                details: vec![Any {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: info.encode_to_vec(),
                }],
            };
            return Status::with_details(code, rpc.message.clone(), rpc.encode_to_vec().into());
        }
        Status::new(code, format!("injected {code:?}"))
    }

    /// Resolves `name` (a CryptoKey or one of its versions) for `permission`.
    fn lookup(
        &self,
        name: &str,
        permission: &str,
    ) -> Result<(&str, &CryptoKey, Option<u32>), Status> {
        let (key_name, version) = match name.split_once("/cryptoKeyVersions/") {
            Some((k, v)) => (
                k,
                Some(v.parse::<u32>().map_err(|_| {
                    Status::invalid_argument(format!("Resource name [{name}] is not valid."))
                })?),
            ),
            None => (name, None),
        };
        if self.denied.contains(key_name) {
            return Err(Status::permission_denied(format!(
                "Permission '{permission}' denied on resource '{name}' (or it may not exist)."
            )));
        }
        let (stored, key) = self
            .keys
            .get_key_value(key_name)
            .ok_or_else(|| Status::not_found(format!("{name} not found.")))?;
        if version.is_some_and(|v| v == 0 || v as usize > key.versions.len()) {
            return Err(Status::not_found(format!("{name} not found.")));
        }
        Ok((stored.as_str(), key, version))
    }

    fn usable_key(key_name: &str, key: &CryptoKey, version: u32) -> Result<[u8; 32], Status> {
        let v = key
            .versions
            .get(version as usize - 1)
            .ok_or_else(invalid_ciphertext)?;
        match (v.state, v.key) {
            (VersionState::Enabled, Some(k)) => Ok(k),
            (state, _) => Err(Status::failed_precondition(format!(
                "{key_name}/cryptoKeyVersions/{version} is not enabled, current state is: {}.",
                state.name()
            ))),
        }
    }

    fn encrypt(&mut self, request: Request<EncryptRequest>) -> Result<EncryptResponse, Status> {
        let seen = seen(Method::Encrypt, &request);
        let mut req = request.into_inner();
        let fault = self.begin(SeenRequest {
            name: req.name.clone(),
            aad: req.additional_authenticated_data.clone(),
            data_crc32c_sent: req.plaintext_crc32c.is_some(),
            aad_crc32c_sent: req.additional_authenticated_data_crc32c.is_some(),
            ..seen
        });
        if let Some(Fault::Status(code)) = fault {
            return Err(self.status_fault(code));
        }
        if fault == Some(Fault::CorruptRequestData) {
            flip_bit(req.plaintext.ref_sensitive_value_mut());
        }
        let plaintext = req.plaintext.ref_sensitive_value();
        let aad = &req.additional_authenticated_data;
        if plaintext.len() > MAX_DATA || aad.len() > MAX_DATA {
            return Err(Status::invalid_argument(
                "The plaintext or additional_authenticated_data is larger than 64KiB.",
            ));
        }
        let (key_name, key, pinned) =
            self.lookup(&req.name, "cloudkms.cryptoKeyVersions.useToEncrypt")?;
        if req.plaintext_crc32c.is_some_and(|c| c != crc(plaintext)) {
            return Err(checksum_mismatch("plaintext_crc32c", "plaintext"));
        }
        if req
            .additional_authenticated_data_crc32c
            .is_some_and(|c| c != crc(aad))
        {
            return Err(checksum_mismatch(
                "additional_authenticated_data_crc32c",
                "additional_authenticated_data",
            ));
        }
        let version = pinned.unwrap_or(key.primary);
        let secret = Self::usable_key(key_name, key, version)?;
        let mut nonce = [0u8; NONCE_LEN];
        keyfold_core::rng::fill(&mut nonce).unwrap();
        let sealed = Aes256Gcm::new(&Key::<Aes256Gcm>::from(secret))
            .encrypt(
                &Nonce::<Aes256Gcm>::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aead_aad(key_name, aad),
                },
            )
            .map_err(|_| Status::internal("encryption failed"))?;
        let mut ciphertext = MAGIC.to_vec();
        ciphertext.extend_from_slice(&version.to_be_bytes());
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&sealed);
        let mut response = EncryptResponse {
            name: format!("{key_name}/cryptoKeyVersions/{version}"),
            ciphertext_crc32c: Some(crc(&ciphertext)),
            ciphertext,
            verified_plaintext_crc32c: req.plaintext_crc32c.is_some(),
            verified_additional_authenticated_data_crc32c: req
                .additional_authenticated_data_crc32c
                .is_some(),
            protection_level: ProtectionLevel::Software as i32,
        };
        match fault {
            Some(Fault::CorruptResponseData) => flip_bit(&mut response.ciphertext),
            Some(Fault::CorruptResponseChecksum) => {
                response.ciphertext_crc32c = response.ciphertext_crc32c.map(|c| c ^ 1);
            }
            Some(Fault::UnverifiedPlaintext) => response.verified_plaintext_crc32c = false,
            Some(Fault::UnverifiedAad) => {
                response.verified_additional_authenticated_data_crc32c = false;
            }
            Some(Fault::ForeignVersionName) => {
                response.name =
                    "projects/other/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1".into();
            }
            _ => {}
        }
        Ok(response)
    }

    fn decrypt(&mut self, request: Request<DecryptRequest>) -> Result<DecryptResponse, Status> {
        let seen = seen(Method::Decrypt, &request);
        let mut req = request.into_inner();
        let fault = self.begin(SeenRequest {
            name: req.name.clone(),
            aad: req.additional_authenticated_data.clone(),
            data_crc32c_sent: req.ciphertext_crc32c.is_some(),
            aad_crc32c_sent: req.additional_authenticated_data_crc32c.is_some(),
            ..seen
        });
        if let Some(Fault::Status(code)) = fault {
            return Err(self.status_fault(code));
        }
        if fault == Some(Fault::CorruptRequestData) {
            flip_bit(&mut req.ciphertext);
        }
        if req.name.contains("/cryptoKeyVersions/") {
            return Err(Status::invalid_argument(
                "Decrypt takes a CryptoKey name, not a CryptoKeyVersion.",
            ));
        }
        let (key_name, key, _) =
            self.lookup(&req.name, "cloudkms.cryptoKeyVersions.useToDecrypt")?;
        let aad = &req.additional_authenticated_data;
        if req
            .ciphertext_crc32c
            .is_some_and(|c| c != crc(&req.ciphertext))
        {
            return Err(checksum_mismatch("ciphertext_crc32c", "ciphertext"));
        }
        if req
            .additional_authenticated_data_crc32c
            .is_some_and(|c| c != crc(aad))
        {
            return Err(checksum_mismatch(
                "additional_authenticated_data_crc32c",
                "additional_authenticated_data",
            ));
        }
        let ct = &req.ciphertext;
        if ct.len() < MAGIC.len() + 4 + NONCE_LEN + 16 || !ct.starts_with(MAGIC) {
            return Err(invalid_ciphertext());
        }
        let version = u32::from_be_bytes(ct[4..8].try_into().unwrap());
        if version == 0 || version as usize > key.versions.len() {
            return Err(invalid_ciphertext());
        }
        let secret = Self::usable_key(key_name, key, version)?;
        let nonce: [u8; NONCE_LEN] = ct[8..8 + NONCE_LEN].try_into().unwrap();
        let plaintext = Aes256Gcm::new(&Key::<Aes256Gcm>::from(secret))
            .decrypt(
                &Nonce::<Aes256Gcm>::from(nonce),
                Payload {
                    msg: &ct[8 + NONCE_LEN..],
                    aad: &aead_aad(key_name, aad),
                },
            )
            .map_err(|_| invalid_ciphertext())?;
        let mut response = DecryptResponse {
            plaintext_crc32c: Some(crc(&plaintext)),
            plaintext: SecretValue::new(plaintext),
            used_primary: version == key.primary,
            protection_level: ProtectionLevel::Software as i32,
        };
        match fault {
            Some(Fault::CorruptResponseData) => {
                flip_bit(response.plaintext.ref_sensitive_value_mut());
            }
            Some(Fault::CorruptResponseChecksum) => {
                response.plaintext_crc32c = response.plaintext_crc32c.map(|c| c ^ 1);
            }
            _ => {}
        }
        Ok(response)
    }
}

fn seen<T>(method: Method, request: &Request<T>) -> SeenRequest {
    let md = request.metadata();
    SeenRequest {
        method,
        name: String::new(),
        aad: Vec::new(),
        data_crc32c_sent: false,
        aad_crc32c_sent: false,
        routing_header: md
            .get("x-goog-request-params")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        authorization_sent: md.get("authorization").is_some(),
    }
}

/// The tonic service: routes the two methods to [`Grpc::unary`] with the
/// prost codec over gcloud-sdk's types (no code generation).
#[derive(Clone)]
struct KmsService {
    state: Arc<Mutex<State>>,
}

impl NamedService for KmsService {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

struct Unary<F>(Arc<Mutex<State>>, F);

impl<Req, Resp, F> UnaryService<Req> for Unary<F>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(&mut State, Request<Req>) -> Result<Resp, Status>,
{
    type Response = Resp;
    type Future = BoxFuture<Result<Response<Resp>, Status>>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let (result, stall) = {
            let mut state = self.0.lock().unwrap();
            let result = (self.1)(&mut state, request).map(Response::new);
            (result, std::mem::take(&mut state.stall))
        };
        Box::pin(async move {
            if stall {
                std::future::pending::<()>().await;
            }
            result
        })
    }
}

impl gcloud_sdk::tonic::codegen::Service<http::Request<Body>> for KmsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let state = Arc::clone(&self.state);
        match request.uri().path() {
            "/google.cloud.kms.v1.KeyManagementService/Encrypt" => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<EncryptResponse, EncryptRequest>::default());
                Ok(grpc.unary(Unary(state, State::encrypt), request).await)
            }),
            "/google.cloud.kms.v1.KeyManagementService/Decrypt" => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<DecryptResponse, DecryptRequest>::default());
                Ok(grpc.unary(Unary(state, State::decrypt), request).await)
            }),
            path => {
                let status = Status::unimplemented(format!("the fake KMS does not serve {path}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
