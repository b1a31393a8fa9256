//! Client tokens: any string presented as a JWT is a user, or refused with a reason,
//! never a panic (the header, the claims and the grants are all read from it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway::auth::Authenticator;
use ringway::config::Config;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static AUTH: Authenticator = Authenticator::from_config(&Config {
            jwt_secret: Some("fuzzing-secret-0123456789".into()),
            ..Config::default()
        })
        .expect("a secret key");
    }
    if let Ok(token) = std::str::from_utf8(data) {
        AUTH.with(|a| {
            if let Err(e) = a.identify(Some(token)) {
                let _ = e.to_string();
            }
        });
    }
});
