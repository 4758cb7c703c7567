//! MLLP, the Minimal Lower Layer Protocol: how HL7 v2 messages travel over TCP, each framed
//! as `0x0B`, the message, `0x1C 0x0D`; and the acknowledgements (`ACK`) that answer them.
//!
//! The `mllp` trigger is served by [`crate::mllp_server`]; the `mllp` target is
//! [`crate::targets::MllpTarget`]. Both speak through [`Frames`], [`write_frame`],
//! [`acknowledgement`] and [`read_ack`].
//!
//! An acknowledgement says one of three things ([`AckCode`]): accepted (`AA`, or `CA` in
//! enhanced mode); an error in the message, so sending it again will not help (`AE`, `CE`);
//! or rejected for a reason unrelated to its content, such as a receiver that cannot take it
//! now, so it is worth sending again later (`AR`, `CR`).

use bytes::{Buf as _, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::error::ServeError;
use crate::hl7::{Place, escape, write_field};
use crate::store::StoredReply;

/// The byte that starts a frame.
const START: u8 = 0x0B;
/// The bytes that end a frame.
const END: [u8; 2] = [0x1C, 0x0D];

/// Why no message could be read off a connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A message longer than the limit.
    #[error("a message is larger than the limit of {0} bytes")]
    TooLarge(usize),
    /// Bytes that are not in a frame.
    #[error("bytes outside a frame: an MLLP message starts with byte 0x0B")]
    Unframed,
    /// The peer closed the connection in the middle of a message.
    #[error("the connection closed inside a message")]
    Truncated,
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads framed messages off a stream, each up to a size limit.
#[derive(Debug)]
pub struct Frames<S> {
    stream: S,
    buffer: BytesMut,
    max: usize,
}

impl<S: AsyncRead + Unpin> Frames<S> {
    /// Frames read off `stream`, each at most `max` bytes.
    pub fn new(stream: S, max: usize) -> Self {
        Self {
            stream,
            buffer: BytesMut::with_capacity(8 * 1024),
            max,
        }
    }

    /// The stream, to answer on.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The next message; `None` when the peer closed the connection between messages.
    /// Line ends between frames are skipped: some senders add them.
    ///
    /// # Errors
    ///
    /// [`FrameError`]: what is wrong with the bytes, or with the connection.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        // Where the search for the end resumes: what was searched has no end in it.
        let mut searched = 0;
        loop {
            let blank = self
                .buffer
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            self.buffer.advance(blank);
            match self.buffer.first() {
                Some(&START) => {
                    let content = &self.buffer[1..];
                    if let Some(end) = content[searched..]
                        .windows(2)
                        .position(|w| w == END)
                        .map(|at| at + searched)
                    {
                        if end > self.max {
                            return Err(FrameError::TooLarge(self.max));
                        }
                        let message = content[..end].to_vec();
                        self.buffer.advance(end + 1 + END.len());
                        return Ok(Some(message));
                    }
                    if content.len() > self.max + END.len() {
                        return Err(FrameError::TooLarge(self.max));
                    }
                    searched = content.len().saturating_sub(1);
                }
                Some(_) => return Err(FrameError::Unframed),
                None => {}
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }
}

/// Writes `message` to `stream` as one frame.
///
/// # Errors
///
/// When the connection fails.
pub async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(message.len() + 1 + END.len());
    framed.push(START);
    framed.extend_from_slice(message);
    framed.extend_from_slice(&END);
    stream.write_all(&framed).await?;
    stream.flush().await
}

/// What an acknowledgement says of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Taken: `AA`, or `CA` in enhanced mode.
    Accept,
    /// Refused for what it holds; sending it again will not help: `AE`, `CE`.
    Error,
    /// Not taken for a reason unrelated to its content; worth sending again later: `AR`,
    /// `CR`.
    Reject,
}

impl AckCode {
    /// The code as MSA-1 writes it, in original or enhanced mode.
    pub fn code(self, enhanced: bool) -> &'static str {
        match (self, enhanced) {
            (Self::Accept, false) => "AA",
            (Self::Error, false) => "AE",
            (Self::Reject, false) => "AR",
            (Self::Accept, true) => "CA",
            (Self::Error, true) => "CE",
            (Self::Reject, true) => "CR",
        }
    }

    /// Reads MSA-1, in either mode.
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "AA" | "CA" => Some(Self::Accept),
            "AE" | "CE" => Some(Self::Error),
            "AR" | "CR" => Some(Self::Reject),
            _ => None,
        }
    }
}

/// Why a message was not accepted: an HL7 error code (table 0357) and what to tell the
/// sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code, such as 207 (application internal error).
    pub code: u16,
    /// What went wrong.
    pub text: String,
}

impl Refusal {
    /// A refusal with the code for "application internal error" (207).
    pub fn internal(text: impl Into<String>) -> Self {
        Self {
            code: 207,
            text: text.into(),
        }
    }

    /// A refusal with the code for "data type error": the message is not HL7 v2.
    pub fn malformed(reason: impl std::fmt::Display) -> Self {
        Self {
            code: 102,
            text: format!("the message is not HL7 v2: {reason}"),
        }
    }

    /// The name HL7 table 0357 gives the code.
    fn name(&self) -> &'static str {
        match self.code {
            100 => "Segment sequence error",
            101 => "Required field missing",
            102 => "Data type error",
            103 => "Table value not found",
            200 => "Unsupported message type",
            204 => "Unknown key identifier",
            205 => "Duplicate key identifier",
            _ => "Application internal error",
        }
    }
}

/// What the acknowledgement of a message handled by a flow says: accepted when the flow
/// took it, an error when a step refused it, rejected when it could not be taken now (the
/// store or a synchronous target is unavailable). Statuses are read as HTTP would read them,
/// so a message is refused for good exactly when an HTTP caller would be told not to retry.
pub fn verdict(result: &Result<StoredReply, ServeError>) -> (AckCode, Option<Refusal>) {
    use crate::retry::{RetryAction, classify_status};
    let (status, code, text) = match result {
        Ok(reply) if reply.status < 400 => return (AckCode::Accept, None),
        Ok(reply) => (
            reply.status,
            207,
            reply.body["message"].as_str().map_or_else(
                || format!("the flow answered {}", reply.status),
                str::to_owned,
            ),
        ),
        Err(error) => {
            let code = match error {
                ServeError::MalformedHl7(_) => 102,
                ServeError::IdempotencyConflict(_) => 205,
                ServeError::Flow(crate::error::FlowError::NotCorrelated { .. }) => 204,
                _ => 207,
            };
            let mut text = error.public_message();
            if let ServeError::Flow(crate::error::FlowError::Invalid { violations, .. }) = error {
                for violation in violations.iter().take(5) {
                    text.push_str(&format!("; {}: {}", violation.pointer, violation.message));
                }
            }
            (error.status().as_u16(), code, text)
        }
    };
    let ack = match classify_status(status) {
        RetryAction::Retry => AckCode::Reject,
        RetryAction::Drop | RetryAction::Done => AckCode::Error,
    };
    (ack, Some(Refusal { code, text }))
}

/// The acknowledgement of `message` (as read into JSON; `None` when it could not be read):
/// an `ACK` addressed back to its sender, whose `MSA` names its control id (MSH-10), with an
/// `ERR` segment saying why when it was not accepted.
///
/// A message whose MSH-15 asks for enhanced mode gets `CA`/`CE`/`CR`, and only when MSH-15
/// asks for one in this case (`AL` always, `NE` never, `ER` on errors, `SU` on success):
/// `None` when it asks for none.
pub fn acknowledgement(
    message: Option<&Value>,
    code: AckCode,
    refusal: Option<&Refusal>,
) -> Option<String> {
    let field = |place: &str| {
        message
            .and_then(|m| Place::parse(place).ok()?.find(m).map(write_field))
            .unwrap_or_default()
    };
    let mode = field("MSH-15");
    let enhanced = !mode.is_empty();
    let wanted = match mode.as_str() {
        "NE" => false,
        "ER" => code != AckCode::Accept,
        "SU" => code == AckCode::Accept,
        _ => true,
    };
    if !wanted {
        return None;
    }
    let event = field("MSH-9.2");
    let structure = if event.is_empty() { "" } else { "^ACK" };
    let mut ack = format!(
        "MSH|^~\\&|{}|{}|{}|{}|{}||ACK^{event}{structure}|{}|{}|{}\rMSA|{}|{}",
        field("MSH-5"),
        field("MSH-6"),
        field("MSH-3"),
        field("MSH-4"),
        timestamp(),
        control_id(),
        field("MSH-11"),
        field("MSH-12"),
        code.code(enhanced),
        field("MSH-10"),
    );
    if let Some(refusal) = refusal {
        let text = escape(&refusal.text);
        // MSA-3 is what older receivers show; ERR (HL7 2.5 layout) is what newer ones read.
        ack.push_str(&format!(
            "|{text}\rERR|||{}^{}^HL70357|E||||{text}",
            refusal.code,
            refusal.name()
        ));
    }
    ack.push('\r');
    Some(ack)
}

/// Now, as an HL7 timestamp in UTC.
fn timestamp() -> String {
    let format = time::macros::format_description!("[year][month][day][hour][minute][second]+0000");
    time::OffsetDateTime::now_utc()
        .format(format)
        .unwrap_or_default()
}

/// A fresh control id for an acknowledgement: 20 characters, the most HL7 2.5 allows.
fn control_id() -> String {
    format!("FERRY{:015}", fastrand::u64(..1_000_000_000_000_000))
}

/// An acknowledgement as read.
#[derive(Debug, Clone)]
pub struct Ack {
    /// What it says.
    pub code: AckCode,
    /// The control id of the message it answers (MSA-2).
    pub answers: Option<String>,
    /// The reason it gives, when it gives one (ERR-8, MSA-3 or ERR-3).
    pub text: Option<String>,
    /// The whole acknowledgement, read into JSON.
    pub body: Value,
}

/// Reads an acknowledgement: any HL7 v2 message with an `MSA` segment (an `ACK`, or an
/// application acknowledgement such as `ORL^O22`).
///
/// # Errors
///
/// What is wrong with it.
pub fn read_ack(bytes: &[u8]) -> Result<Ack, String> {
    let body =
        crate::hl7::read(bytes).map_err(|e| format!("the acknowledgement is not HL7 v2: {e}"))?;
    let text_at = |place: &str| {
        Place::parse(place)
            .ok()?
            .find(&body)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let code = text_at("MSA-1").ok_or("the acknowledgement has no MSA-1")?;
    let code = AckCode::parse(&code).ok_or_else(|| {
        format!("the acknowledgement code \"{code}\" is none of AA, AE, AR, CA, CE, CR")
    })?;
    let text = text_at("ERR-8")
        .or_else(|| text_at("MSA-3"))
        .or_else(|| text_at("ERR-3.2"));
    Ok(Ack {
        code,
        answers: text_at("MSA-2"),
        text,
        body,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ORU: &str = "MSH|^~\\&|LAB|HELIX|FERRY|PORTAL|20260417120000||ORU^R01^ORU_R01|MSG0001|P|2.5.1\rOBR|1|PR-1\r";

    #[tokio::test]
    async fn frames_are_read_one_by_one_whatever_the_reads_cut() {
        let mut wire = Vec::new();
        for message in [&b"MSH|one"[..], b"MSH|two", b""] {
            wire.push(START);
            wire.extend_from_slice(message);
            wire.extend_from_slice(&END);
            wire.extend_from_slice(b"\r\n");
        }
        // Every cut of the stream into two reads gives the same frames.
        for cut in 0..wire.len() {
            let (first, second) = wire.split_at(cut);
            let stream = tokio_test_stream(first, second);
            let mut frames = Frames::new(stream, 64);
            let mut got = Vec::new();
            while let Some(frame) = frames.next().await.unwrap() {
                got.push(frame);
            }
            assert_eq!(got, [&b"MSH|one"[..], b"MSH|two", b""], "cut at {cut}");
        }
    }

    /// A stream that yields `first`, then `second`, in two reads.
    fn tokio_test_stream(first: &[u8], second: &[u8]) -> impl AsyncRead + Unpin {
        tokio::io::AsyncReadExt::chain(
            std::io::Cursor::new(first.to_vec()),
            std::io::Cursor::new(second.to_vec()),
        )
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_garbage_and_a_cut_message_are_refused() {
        let read = |bytes: &'static [u8]| async move {
            Frames::new(bytes, 8).next().await.unwrap_err().to_string()
        };
        assert!(
            read(b"\x0b123456789\x1c\r")
                .await
                .contains("larger than the limit of 8")
        );
        assert!(read(b"\x0b1234567890123").await.contains("larger than"));
        assert!(
            read(b"GET / HTTP/1.1\r\n")
                .await
                .contains("starts with byte 0x0B")
        );
        assert!(read(b"\x0bMSH|").await.contains("closed inside a message"));
        assert!(Frames::new(&b"\r\n"[..], 8).next().await.unwrap().is_none());
    }

    #[test]
    fn an_acknowledgement_answers_the_sender_and_names_the_control_id() {
        let message = crate::hl7::parse(ORU).unwrap();
        let ack = acknowledgement(Some(&message), AckCode::Accept, None).unwrap();
        let read = crate::hl7::parse(&ack).unwrap();
        assert_eq!(read["MSH"][0]["3"], "FERRY");
        assert_eq!(read["MSH"][0]["5"], "LAB");
        assert_eq!(read["MSH"][0]["6"], "HELIX");
        assert_eq!(
            read["MSH"][0]["9"],
            json!({"1": "ACK", "2": "R01", "3": "ACK"})
        );
        assert_eq!(read["MSH"][0]["12"], "2.5.1");
        assert_eq!(read["MSA"][0], json!({"1": "AA", "2": "MSG0001"}));
        assert!(read.get("ERR").is_none());
        let back = read_ack(ack.as_bytes()).unwrap();
        assert_eq!(
            (back.code, back.answers.as_deref(), back.text),
            (AckCode::Accept, Some("MSG0001"), None)
        );
    }

    #[test]
    fn a_refusal_says_why_in_err_escaped_for_hl7() {
        let message = crate::hl7::parse(ORU).unwrap();
        let refusal = Refusal {
            code: 207,
            text: "/patient|name: \"a^b\" is not a string\rPID|forged".into(),
        };
        let ack = acknowledgement(Some(&message), AckCode::Error, Some(&refusal)).unwrap();
        assert_eq!(
            ack.matches('\r').count(),
            3,
            "MSH, MSA, ERR and nothing forged: {ack}"
        );
        let back = read_ack(ack.as_bytes()).unwrap();
        assert_eq!(back.code, AckCode::Error);
        assert_eq!(back.text.as_deref(), Some(refusal.text.as_str()));
        assert_eq!(
            back.body["ERR"][0]["3"],
            json!({"1": "207", "2": "Application internal error", "3": "HL70357"})
        );
        // A message that could not be read still gets an answer.
        let ack = acknowledgement(None, AckCode::Error, Some(&Refusal::malformed("x"))).unwrap();
        assert_eq!(read_ack(ack.as_bytes()).unwrap().code, AckCode::Error);
    }

    #[test]
    fn enhanced_mode_answers_with_commit_codes_when_and_only_when_asked() {
        let with = |mode: &str| {
            let text = ORU.replacen("|P|2.5.1", &format!("|P|2.5.1|||{mode}"), 1);
            crate::hl7::parse(&text).unwrap()
        };
        let code = |mode: &str, code: AckCode| {
            acknowledgement(Some(&with(mode)), code, None)
                .map(|ack| read_ack(ack.as_bytes()).unwrap().body["MSA"][0]["1"].clone())
        };
        assert_eq!(code("AL", AckCode::Accept), Some(json!("CA")));
        assert_eq!(code("AL", AckCode::Reject), Some(json!("CR")));
        assert_eq!(code("NE", AckCode::Accept), None);
        assert_eq!(code("ER", AckCode::Accept), None);
        assert_eq!(code("ER", AckCode::Error), Some(json!("CE")));
        assert_eq!(code("SU", AckCode::Accept), Some(json!("CA")));
        assert_eq!(code("SU", AckCode::Error), None);
    }

    #[test]
    fn a_verdict_follows_what_an_http_caller_would_be_told() {
        use crate::error::FlowError;
        let reply = |status| StoredReply {
            status,
            headers: Vec::new(),
            body: json!({}),
        };
        assert_eq!(verdict(&Ok(reply(202))), (AckCode::Accept, None));
        assert_eq!(verdict(&Ok(reply(503))).0, AckCode::Reject);
        let refused: Result<StoredReply, ServeError> = Err(FlowError::NoRoute.into());
        assert_eq!(verdict(&refused).0, AckCode::Error);
        let down: Result<StoredReply, ServeError> =
            Err(FlowError::Unavailable("disk".into()).into());
        let (code, refusal) = verdict(&down);
        assert_eq!(code, AckCode::Reject);
        assert!(
            !refusal.unwrap().text.contains("disk"),
            "reasons of 5xx stay in the log"
        );
        let unknown: Result<StoredReply, ServeError> = Err(FlowError::NotCorrelated {
            context: "test-request".into(),
            keys: vec!["PR-9".into()],
        }
        .into());
        assert_eq!(verdict(&unknown).1.unwrap().code, 204);
    }

    #[test]
    fn acknowledgements_that_are_not_are_refused() {
        assert!(read_ack(b"hello").unwrap_err().contains("not HL7 v2"));
        assert!(read_ack(b"MSH|^~\\&|A\r").unwrap_err().contains("no MSA-1"));
        assert!(
            read_ack(b"MSH|^~\\&|A\rMSA|OK|1\r")
                .unwrap_err()
                .contains("none of AA")
        );
    }
}
