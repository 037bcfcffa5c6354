//! The raw SoftHSM ceiling for the benchmarks' `ratio`: single-thread `C_Encrypt`
//! `CKM_AES_GCM` of 32 bytes with a fresh random 96-bit IV per call (as the server wraps a data
//! key), 128-bit tag and server-sized AAD, on a throwaway AES-256 token key made with the
//! server's master-key template (sensitive, never extractable) in the server's own token.
//! kms-bench and rewrap-bench both measure their denominator here.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use rand::RngCore;

use crate::{PIN, TOKEN_LABEL};

/// A session with the ceiling key; the key is destroyed on drop.
pub struct HsmCeiling {
    session: Session,
    key: ObjectHandle,
    aad_len: usize,
    /// Prefix of the progress lines on stderr ("kms-bench").
    who: &'static str,
    // Keeps the module initialised while the session lives (fields drop in this order).
    _ctx: Pkcs11,
}

/// One measurement: the overall rate and the slowest and fastest one-second slice.
#[derive(Debug, Clone, Copy)]
pub struct CeilingRate {
    pub ops_per_s: f64,
    pub slowest_slice: f64,
    pub fastest_slice: f64,
}

impl HsmCeiling {
    /// Loads the PKCS#11 module for the token at `softhsm_conf` (once per process: SoftHSM
    /// reads its configuration in C_Initialize) and creates the key `label`.
    pub fn open(
        softhsm_conf: &Path,
        label: &str,
        aad_len: usize,
        who: &'static str,
    ) -> Result<HsmCeiling> {
        std::env::set_var("SOFTHSM2_CONF", softhsm_conf);
        let module = crate::pkcs11_module();
        let ctx = Pkcs11::new(&module).with_context(|| format!("loading {}", module.display()))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .context("C_Initialize")?;
        let slot = ctx
            .get_slots_with_initialized_token()?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|i| i.label().trim_end() == TOKEN_LABEL)
                    .unwrap_or(false)
            })
            .ok_or_else(|| {
                anyhow!(
                    "no token labelled {TOKEN_LABEL} in {}",
                    softhsm_conf.display()
                )
            })?;
        let session = ctx.open_rw_session(slot)?;
        match session.login(UserType::User, Some(&AuthPin::from(PIN))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(e).context("C_Login"),
        }
        let label = label.as_bytes().to_vec();
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Label(label.clone()),
            Attribute::Id(label),
        ];
        let key = session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .context("generating the ceiling key")?;
        Ok(HsmCeiling {
            _ctx: ctx,
            session,
            key,
            aad_len,
            who,
        })
    }

    /// The rate over `duration` (after 500 unmeasured calls), in one-second slices to show
    /// how steady the machine is; printed on stderr.
    pub fn measure(&self, duration: Duration) -> Result<CeilingRate> {
        let mut aad = vec![0u8; self.aad_len];
        let mut data = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut aad);
        rand::rngs::OsRng.fill_bytes(&mut data);
        let seal = || -> Result<()> {
            let mut iv = [0u8; 12];
            rand::rngs::OsRng.fill_bytes(&mut iv);
            let params = GcmParams::new(&mut iv, &aad, 128.into())?;
            let out = self
                .session
                .encrypt(&Mechanism::AesGcm(params), self.key, &data)?;
            if out.len() != 48 {
                bail!("AES-GCM of 32 bytes gave {} bytes", out.len());
            }
            Ok(())
        };
        for _ in 0..500 {
            seal()?;
        }
        let started = Instant::now();
        let mut ops = 0u64;
        let mut slices = Vec::new();
        while started.elapsed() < duration {
            let slice_start = Instant::now();
            let mut n = 0u64;
            while slice_start.elapsed() < Duration::from_secs(1) && started.elapsed() < duration {
                seal()?;
                n += 1;
            }
            ops += n;
            slices.push(n as f64 / slice_start.elapsed().as_secs_f64());
        }
        let ops_per_s = ops as f64 / started.elapsed().as_secs_f64();
        let (slowest_slice, fastest_slice) = slices
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        eprintln!(
            "{}: HSM ceiling (C_Encrypt CKM_AES_GCM, 32 B, 1 thread, {:.0} s): {ops_per_s:.0} \
             ops/s ({:.1} µs/op; 1-s slices {slowest_slice:.0}..{fastest_slice:.0})",
            self.who,
            duration.as_secs_f64(),
            1e6 / ops_per_s
        );
        Ok(CeilingRate {
            ops_per_s,
            slowest_slice,
            fastest_slice,
        })
    }
}

impl Drop for HsmCeiling {
    fn drop(&mut self) {
        if let Err(e) = self.session.destroy_object(self.key) {
            eprintln!("{}: could not destroy the ceiling key: {e}", self.who);
        }
    }
}
