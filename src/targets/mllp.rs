//! `mllp` target: sends the message's HL7 v2 text to a partner over MLLP and waits for its
//! acknowledgement. `AA`/`CA` is delivery; `AR`/`CR`, no answer, and an answer to another
//! message are tried again; `AE`/`CE` is given up, the acknowledgement kept in the error.
//! Connections (plain TCP, or TLS) are kept open and reused, one message at a time on each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{Attempt, RetryAction, lock};
use crate::compile::Ctx;
use crate::config::MllpTargetConfig;
use crate::error::FlowError;
use crate::jsonpath::JsonPath;
use crate::message::Message;
use crate::mllp::{AckCode, Frames, read_ack, write_frame};

/// How long to wait for an acknowledgement unless the target says.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest acknowledgement read.
const MAX_ACK: usize = 1024 * 1024;
/// Idle connections kept per target.
const POOL: usize = 16;

/// A connection to a partner: plain TCP, or TLS over it.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// A compiled `mllp` target.
pub struct MllpTarget {
    name: String,
    address: String,
    timeout: Duration,
    capture: Vec<(String, JsonPath)>,
    /// How to speak TLS to the partner, and the name its certificate must hold.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    idle: Mutex<Vec<Box<dyn Connection>>>,
}

impl std::fmt::Debug for MllpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MllpTarget")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl MllpTarget {
    pub(crate) fn compile(
        name: &str,
        config: &MllpTargetConfig,
        ctx: &mut Ctx<'_>,
    ) -> Option<Self> {
        let address = &config.address;
        let valid = address.value.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            ctx.error(
                address.referenced,
                format!(
                    "\"{}\" is not a partner's address: write host:port, such as lab.example:2575",
                    address.value
                ),
            );
        }
        let timeout = match &config.timeout {
            Some(t) => ctx.duration(&t.value, t.referenced),
            None => Some(DEFAULT_TIMEOUT),
        };
        let capture = super::compile_captures(&config.capture, ctx);
        if !valid {
            return None;
        }
        let tls = match &config.tls {
            Some(tls) => Some(client_tls(tls, &address.value, address.referenced, ctx)?),
            None => None,
        };
        Some(Self {
            name: name.to_owned(),
            address: address.value.clone(),
            timeout: timeout?,
            capture: capture?,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// How long an attempt waits for the acknowledgement.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The HL7 v2 text `message` sends, and its control id (MSH-10) that the
    /// acknowledgement must name.
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] when the body is not HL7 v2 text: then it can never be
    /// sent, and the message is refused when it arrives rather than failing later.
    pub fn prepare(&self, message: &Message) -> Result<(String, String), FlowError> {
        let unprocessable = |reason: String| FlowError::Unprocessable {
            context: format!("target \"{}\"", self.name),
            reason,
        };
        let text = match (message.content_type(), message.body()) {
            (Some(content_type), serde_json::Value::String(text))
                if crate::hl7::is_hl7(content_type) =>
            {
                text
            }
            _ => {
                return Err(unprocessable(
                    "an mllp target sends HL7 v2 text: render it with a transform whose content_type is x-application/hl7-v2+er7".into(),
                ));
            }
        };
        let read = crate::hl7::parse(text)
            .map_err(|e| unprocessable(format!("the message to send is not HL7 v2: {e}")))?;
        let control_id = read["MSH"][0]["10"].as_str().unwrap_or_default().to_owned();
        Ok((text.clone(), control_id))
    }

    /// Sends `message` and reads what its acknowledgement says.
    pub(crate) async fn attempt(&self, message: &mut Message) -> Attempt {
        let (text, control_id) = match self.prepare(message) {
            Ok(prepared) => prepared,
            Err(error) => return Attempt::failed(RetryAction::Drop, None, error.to_string()),
        };
        match tokio::time::timeout(self.timeout, self.exchange(text.as_bytes())).await {
            Err(_) => Attempt::failed(
                RetryAction::Retry,
                None,
                format!("no acknowledgement within {:?}", self.timeout),
            ),
            Ok(Err(error)) => Attempt::failed(RetryAction::Retry, None, error),
            Ok(Ok(ack)) => self.settle(&ack, &control_id, message),
        }
    }

    /// What an acknowledgement means for the message sent with `control_id`; on `AA`/`CA`,
    /// the captures go into `message`'s vars.
    pub(crate) fn settle(&self, ack: &[u8], control_id: &str, message: &mut Message) -> Attempt {
        self.judge(ack, control_id, message).answered(ack)
    }

    fn judge(&self, ack: &[u8], control_id: &str, message: &mut Message) -> Attempt {
        let text = String::from_utf8_lossy(ack).replace('\r', "\n");
        let ack = match read_ack(ack) {
            Ok(ack) => ack,
            Err(error) => return Attempt::failed(RetryAction::Retry, None, error),
        };
        if ack.answers.as_deref().unwrap_or_default() != control_id {
            return Attempt::failed(
                RetryAction::Retry,
                None,
                format!(
                    "the acknowledgement answers control id \"{}\", not \"{control_id}\"",
                    ack.answers.unwrap_or_default()
                ),
            );
        }
        let why = ack.text.as_deref().unwrap_or("no reason given");
        match ack.code {
            AckCode::Accept => {
                for (var, path) in &self.capture {
                    message.set_var(var, path.extract(&ack.body));
                }
                Attempt::done(None)
            }
            AckCode::Reject => Attempt::failed(
                RetryAction::Retry,
                None,
                format!(
                    "rejected ({}): {why}",
                    ack.body["MSA"][0]["1"].as_str().unwrap_or("AR")
                ),
            ),
            AckCode::Error => Attempt::failed(
                RetryAction::Drop,
                None,
                format!(
                    "refused ({}): {why}\nacknowledgement:\n{text}",
                    ack.body["MSA"][0]["1"].as_str().unwrap_or("AE")
                ),
            ),
        }
    }

    /// Sends `payload` on a kept connection, or a new one, and reads the acknowledgement. A
    /// kept connection the partner has closed meanwhile is replaced once.
    async fn exchange(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        loop {
            let kept = lock(&self.idle).pop();
            let reused = kept.is_some();
            let mut stream = match kept {
                Some(stream) => stream,
                None => self.connect().await?,
            };
            match send_and_read(&mut stream, payload).await {
                Ok(ack) => {
                    let mut idle = lock(&self.idle);
                    if idle.len() < POOL {
                        idle.push(stream);
                    }
                    return Ok(ack);
                }
                Err(_) if reused => {}
                Err(error) => return Err(format!("{}: {error}", self.address)),
            }
        }
    }
}

impl MllpTarget {
    /// A new connection to the partner, over TLS when the target says so.
    async fn connect(&self) -> Result<Box<dyn Connection>, String> {
        let stream = TcpStream::connect(&self.address)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.address))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(stream)),
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", self.address))?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// The TLS client of a target at `address`: the public web's authorities, and the CA of
/// `ca_file` besides; the host of `address` is the name its certificate must hold.
fn client_tls(
    config: &crate::config::TargetTlsConfig,
    address: &str,
    at: serde_saphyr::Location,
    ctx: &mut Ctx<'_>,
) -> Option<(tokio_rustls::TlsConnector, ServerName<'static>)> {
    use rustls_pki_types::pem::PemObject as _;
    if config.insecure_skip_verify {
        ctx.error(
            at,
            "an mllp target verifies its partner's certificate: give the partner's CA in `ca_file` instead of insecure_skip_verify",
        );
        return None;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(file) = &config.ca_file {
        let pem = ctx.read_project_file(&file.value, file.referenced)?;
        let certificates: Result<Vec<_>, _> =
            rustls_pki_types::CertificateDer::pem_slice_iter(&pem).collect();
        match certificates {
            Ok(certificates) if !certificates.is_empty() => {
                roots.add_parsable_certificates(certificates);
            }
            _ => {
                ctx.error(
                    file.referenced,
                    format!("{} holds no PEM certificate", file.value),
                );
                return None;
            }
        }
    }
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        ctx.error(
            at,
            format!("\"{host}\" is not a name a certificate can hold"),
        );
        return None;
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some((tokio_rustls::TlsConnector::from(Arc::new(client)), name))
}

/// One exchange on `stream`: the message out, its acknowledgement in.
async fn send_and_read(
    stream: &mut Box<dyn Connection>,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    write_frame(stream, payload)
        .await
        .map_err(|e| e.to_string())?;
    Frames::new(stream, MAX_ACK)
        .next()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the connection closed before an acknowledgement".to_owned())
}
