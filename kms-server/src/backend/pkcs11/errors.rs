//! Classification of PKCS#11 return values into backend errors.
//!
//! The important split is between "the device is in trouble" (the session is thrown away and
//! the caller gets UNAVAILABLE) and "this request is wrong" (the session stays healthy).

use cryptoki::error::{Error, RvError};

use crate::backend::BackendError;

/// What to do with the session after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// The session or token is broken: discard the session and the object-handle cache.
    Device,
    /// The cached object handle is stale: forget it and look the object up again.
    StaleHandle,
    /// A problem with this request only; the session is fine.
    Request,
}

pub(super) fn classify(err: &Error) -> Fault {
    match err {
        Error::Pkcs11(rv, _) => match rv {
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid
            | RvError::PinIncorrect
            | RvError::PinExpired
            | RvError::PinLocked
            | RvError::HostMemory
            // "Some horrible, unrecoverable error" (PKCS#11): SoftHSM gives it when its token
            // files changed under it. Decrypt checks for a GCM tag failure (also
            // CKR_GENERAL_ERROR in SoftHSM) before it gets here.
            | RvError::GeneralError => Fault::Device,
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Fault::StaleHandle,
            _ => Fault::Request,
        },
        Error::LibraryLoading(_) | Error::NullFunctionPointer | Error::MissingSymbol(_) => {
            Fault::Device
        }
        _ => Fault::Request,
    }
}

/// Is this the error a GCM decryption gives for a wrong tag, AAD or IV?
/// SoftHSM returns CKR_GENERAL_ERROR; other tokens CKR_ENCRYPTED_DATA_INVALID.
pub(super) fn is_auth_failure(err: &Error) -> bool {
    matches!(
        err,
        Error::Pkcs11(
            RvError::GeneralError | RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
            _
        )
    )
}

/// A device-level failure as a backend error. The PKCS#11 code is fine to show: it holds no
/// secret and operators need it.
pub(super) fn unavailable(what: &str, err: &Error) -> BackendError {
    BackendError::Unavailable(format!("{what}: {err_short}", err_short = short(err)))
}

pub(super) fn internal(what: &str, err: &Error) -> BackendError {
    BackendError::Internal(format!("{what}: {}", short(err)))
}

/// The return-value name without cryptoki's long prose.
pub(super) fn short(err: &Error) -> String {
    match err {
        Error::Pkcs11(rv, func) => format!("{rv:?} in {func:?}"),
        other => format!("{other:?}"),
    }
}
