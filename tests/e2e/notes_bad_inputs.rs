//! Bad inputs to every notes RPC get a specific status, never a panic, and change nothing.
//!
//! Body and reason are `bytes` fields that notes-store checks for UTF-8 itself (INVALID_ARGUMENT).
//! Invalid UTF-8 in a `string` field (the ids) is refused by protobuf decoding before any handler
//! runs; tonic reports that as INTERNAL ("failed to decode Protobuf message"), as the gRPC status
//! code guide prescribes for parse errors. Both are checked here.

use kms_proto::notes::v1 as pb;
use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{KmsServer, NotesOptions, NotesServer, ServerOptions};
use tonic::Code;

const MAX_BODY: usize = 2048;

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(r) => panic!("accepted: {r:?}"),
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn bad_inputs_get_specific_statuses() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(
        &kms,
        NotesOptions {
            max_body_bytes: MAX_BODY,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut c = notes.client().await.unwrap();
    let ok = create_request("site-a", "c-1", "2024-01-31", "fine");
    let id = c
        .create_note(ok.clone())
        .await
        .unwrap()
        .into_inner()
        .note_id;

    // --- CreateNote
    let at_limit = "é".repeat(MAX_BODY / 2);
    c.create_note(create_request("site-a", "c-1", "2024-01-31", &at_limit))
        .await
        .unwrap();
    let cases: Vec<(&str, pb::CreateNoteRequest, Code)> = vec![
        (
            "empty body",
            pb::CreateNoteRequest {
                body: vec![],
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "body one byte over",
            pb::CreateNoteRequest {
                body: vec![b'a'; MAX_BODY + 1],
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "body far over the message limit",
            pb::CreateNoteRequest {
                body: vec![b'a'; 64 * MAX_BODY],
                ..ok.clone()
            },
            Code::OutOfRange,
        ),
        (
            "invalid UTF-8 body",
            pb::CreateNoteRequest {
                body: vec![b'o', b'k', 0xff, 0xfe],
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "truncated UTF-8 body",
            pb::CreateNoteRequest {
                body: "é".as_bytes()[..1].to_vec(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "no site",
            pb::CreateNoteRequest {
                site_id: "".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "no client",
            pb::CreateNoteRequest {
                client_id: "".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "no author",
            pb::CreateNoteRequest {
                author_id: "".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "a name as client id",
            pb::CreateNoteRequest {
                client_id: "Jane Doe".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "65-char site id",
            pb::CreateNoteRequest {
                site_id: "s".repeat(65),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "no date",
            pb::CreateNoteRequest {
                session_date: "".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "impossible date",
            pb::CreateNoteRequest {
                session_date: "2023-02-29".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "non-ISO date",
            pb::CreateNoteRequest {
                session_date: "31/01/2024".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(c.create_note(req).await), want, "CreateNote: {what}");
    }

    // Invalid UTF-8 in a protobuf `string` field: refused at decode time.
    let status = create_with_invalid_utf8_id(&notes).await;
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");

    // --- GetNote
    let unknown = uuid::Uuid::new_v4().to_string();
    let g = |f: fn(&mut pb::GetNoteRequest)| {
        let mut r = get_request(&id, 0);
        f(&mut r);
        r
    };
    let cases: Vec<(&str, pb::GetNoteRequest, Code)> = vec![
        ("unknown note", get_request(&unknown, 0), Code::NotFound),
        (
            "malformed id",
            get_request("note-1", 0),
            Code::InvalidArgument,
        ),
        ("empty id", get_request("", 0), Code::InvalidArgument),
        (
            "revision beyond current",
            get_request(&id, 2),
            Code::NotFound,
        ),
        (
            "no acting user",
            g(|r| r.acting_user.clear()),
            Code::InvalidArgument,
        ),
        (
            "bad acting user",
            g(|r| r.acting_user = "a user".into()),
            Code::InvalidArgument,
        ),
        ("no purpose", g(|r| r.purpose = 0), Code::InvalidArgument),
        (
            "unknown purpose",
            g(|r| r.purpose = 99),
            Code::InvalidArgument,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(c.get_note(req).await), want, "GetNote: {what}");
    }
    for purpose in [
        pb::PurposeOfUse::Treatment,
        pb::PurposeOfUse::Supervision,
        pb::PurposeOfUse::ClientRequest,
        pb::PurposeOfUse::Legal,
        pb::PurposeOfUse::BreakGlass,
    ] {
        let mut r = get_request(&id, 1);
        r.purpose = purpose as i32;
        assert_eq!(c.get_note(r).await.unwrap().into_inner().body, "fine");
    }

    // --- ListNotes
    let l = |f: fn(&mut pb::ListNotesRequest)| {
        let mut r = pb::ListNotesRequest {
            site_id: "site-a".into(),
            client_id: "c-1".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let cases: Vec<(&str, pb::ListNotesRequest, Code)> = vec![
        (
            "no client",
            l(|r| r.client_id.clear()),
            Code::InvalidArgument,
        ),
        ("no site", l(|r| r.site_id.clear()), Code::InvalidArgument),
        (
            "garbage token",
            l(|r| r.page_token = "garbage".into()),
            Code::InvalidArgument,
        ),
        (
            "token with bad id",
            l(|r| r.page_token = "n1.2024-01-01.zz".into()),
            Code::InvalidArgument,
        ),
        (
            "token with bad date",
            l(|r| r.page_token = "n1.2024-13-01.00000000000000000000000000000000".into()),
            Code::InvalidArgument,
        ),
        (
            "page too large",
            l(|r| r.page_size = 501),
            Code::InvalidArgument,
        ),
        (
            "bad from date",
            l(|r| r.session_date_from = "2024-1-1".into()),
            Code::InvalidArgument,
        ),
        (
            "from after to",
            l(|r| {
                r.session_date_from = "2024-02-01".into();
                r.session_date_to = "2024-01-01".into();
            }),
            Code::InvalidArgument,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(c.list_notes(req).await), want, "ListNotes: {what}");
    }
    let none = c
        .list_notes(l(|r| r.client_id = "nobody".into()))
        .await
        .unwrap();
    assert!(none.into_inner().notes.is_empty());

    // --- AmendNote
    let cases: Vec<(&str, pb::AmendNoteRequest, Code)> = vec![
        (
            "unknown note",
            amend_request(&unknown, 1, "b", "r"),
            Code::NotFound,
        ),
        (
            "malformed id",
            amend_request("x", 1, "b", "r"),
            Code::InvalidArgument,
        ),
        (
            "expected 0",
            amend_request(&id, 0, "b", "r"),
            Code::InvalidArgument,
        ),
        (
            "stale expected",
            amend_request(&id, 5, "b", "r"),
            Code::FailedPrecondition,
        ),
        (
            "empty body",
            amend_request(&id, 1, "", "r"),
            Code::InvalidArgument,
        ),
        (
            "no reason",
            amend_request(&id, 1, "b", ""),
            Code::InvalidArgument,
        ),
        (
            "reason too long",
            amend_request(&id, 1, "b", &"r".repeat(4097)),
            Code::InvalidArgument,
        ),
        (
            "invalid UTF-8 reason",
            pb::AmendNoteRequest {
                reason: vec![0xc3, 0x28],
                ..amend_request(&id, 1, "b", "r")
            },
            Code::InvalidArgument,
        ),
        (
            "no author",
            pb::AmendNoteRequest {
                author_id: "".into(),
                ..amend_request(&id, 1, "b", "r")
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(c.amend_note(req).await), want, "AmendNote: {what}");
    }

    // --- GetNoteHistory
    for (what, note_id, want) in [
        ("unknown", unknown.as_str(), Code::NotFound),
        ("malformed", "x", Code::InvalidArgument),
        ("empty", "", Code::InvalidArgument),
    ] {
        let r = c
            .get_note_history(pb::GetNoteHistoryRequest {
                note_id: note_id.into(),
            })
            .await;
        assert_eq!(code(r), want, "GetNoteHistory: {what}");
    }

    // Nothing above changed the note, and nothing panicked.
    let history = c
        .get_note_history(pb::GetNoteHistoryRequest {
            note_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.revisions.len(), 1);
    let listed = c.list_notes(l(|_| {})).await.unwrap().into_inner();
    assert_eq!(listed.notes.len(), 2, "only the two valid notes exist");
    assert!(!notes.log().contains("panicked"), "{}", notes.log());
}

/// CreateNoteRequest with `bytes` where the real message has `string`, to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct LooseCreateNote {
    #[prost(bytes = "vec", tag = "1")]
    site_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    client_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    author_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    session_date: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    body: Vec<u8>,
}

/// Sends a CreateNote whose site id is not UTF-8 and returns the status.
async fn create_with_invalid_utf8_id(notes: &NotesServer) -> tonic::Status {
    let channel = notes.channel("app").await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = LooseCreateNote {
        site_id: b"site\xff".to_vec(),
        client_id: b"c-1".to_vec(),
        author_id: b"a".to_vec(),
        session_date: b"2024-01-01".to_vec(),
        body: b"x".to_vec(),
    };
    grpc.unary(
        tonic::Request::new(request),
        tonic::codegen::http::uri::PathAndQuery::from_static("/notes.v1.NotesService/CreateNote"),
        tonic_prost::ProstCodec::<LooseCreateNote, pb::CreateNoteResponse>::default(),
    )
    .await
    .unwrap_err()
}
