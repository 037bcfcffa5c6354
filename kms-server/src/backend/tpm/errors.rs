//! Classification of TSS and TPM return codes into "the device is in trouble" (drop the
//! connection, answer UNAVAILABLE, reconnect on a later call) and "this request is wrong".

use tss_esapi::constants::response_code::Tss2ResponseCode;
use tss_esapi::{Error, WrapperErrorKind};

use crate::backend::BackendError;

/// The layer byte of a TSS2_RC (bits 16..24): 0 is the TPM itself; 0x0A the TCTI (socket,
/// device file), 0x07 ESAPI, 0x08 SAPI, 0x09 marshalling, 0x0B resource manager.
const LAYER_SHIFT: u32 = 16;

/// A failed TSS call, with what was being done (for the message).
#[derive(Debug)]
pub(super) enum Fault {
    Tss(&'static str, Error),
    Backend(BackendError),
}

impl From<BackendError> for Fault {
    fn from(e: BackendError) -> Self {
        Fault::Backend(e)
    }
}

/// `map_err` helper: `ctx.load(..).map_err(tss("load"))`.
pub(super) fn tss(what: &'static str) -> impl Fn(Error) -> Fault {
    move |e| Fault::Tss(what, e)
}

/// The raw TSS2_RC: tss-esapi 7 only shows it through `Display` ("Response code value: 0x…").
pub(super) fn raw_code(err: &Error) -> Option<u32> {
    let text = match err {
        Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => rc.to_string(),
        Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => rc.to_string(),
        _ => return None,
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// Is this a fault of the device or the connection (as opposed to this request)?
pub(super) fn is_device_fault(err: &Error) -> bool {
    match err {
        Error::WrapperError(kind) => matches!(
            kind,
            WrapperErrorKind::WrongValueFromTpm | WrapperErrorKind::InvalidHandleState
        ),
        Error::Tss2Error(Tss2ResponseCode::Success) => false,
        Error::Tss2Error(rc) => {
            let Some(raw) = raw_code(err) else {
                return true;
            };
            if raw >> LAYER_SHIFT != 0 {
                // TCTI, ESAPI, SAPI, marshalling, resource manager: the connection.
                return true;
            }
            match rc {
                // Format zero: bit 11 = warning (retry, testing, object memory, a handle that
                // is not loaded any more, NV rate, lockout…); else TPM_RC_INITIALIZE,
                // TPM_RC_FAILURE, TPM_RC_REBOOT.
                Tss2ResponseCode::FormatZero(_) => {
                    raw & 0x800 != 0 || matches!(raw & 0x7F, 0x000 | 0x001 | 0x030)
                }
                _ => false,
            }
        }
    }
}

/// A device fault as UNAVAILABLE. TSS return codes hold no secret and operators need them.
pub(super) fn unavailable(what: &str, err: &Error) -> BackendError {
    BackendError::Unavailable(format!("TPM {what}: {}", describe(err)))
}

pub(super) fn describe(err: &Error) -> String {
    match raw_code(err) {
        Some(raw) => format!("{err} (rc {raw:#x})"),
        None => err.to_string(),
    }
}
