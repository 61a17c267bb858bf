//! The service-account token decoder: no input panics, and an accepted token has a canonical
//! pod UID.
#![no_main]

use pod_identity_agent_fuzz::token;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(claims) = token::parse(text, 1_700_000_000) {
        let uid = claims.pod_uid.as_str();
        assert_eq!(uid.len(), 36);
        assert!(
            uid.bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert!(claims.expires_at > 1_700_000_000);
    }
});
