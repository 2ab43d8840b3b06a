//! Events in both directions. A client subscribes to a topic by sending the server a
//! `Sender<Event>` (the server pushes into it); it can also ask the server for a
//! `Receiver<Event>` of the server's own making (a watch). And the client publishes its
//! own events to the server on a channel it opens. Over tcp, addressed by URL.
//!
//! ```sh
//! cargo run --example events
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use libchan::{channel, Receiver, Sender, Session};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Event {
    topic: String,
    seq: u64,
    text: String,
}

#[derive(Serialize, Deserialize)]
enum Request {
    /// Push every event of `topic` into `events`.
    Subscribe {
        topic: String,
        events: Sender<Event>,
    },
    /// Reply with a Receiver of the server's own for `topic`.
    Watch {
        topic: String,
        reply: Sender<Receiver<Event>>,
    },
    /// Events the client publishes, for the server to fan out.
    Publish(Receiver<Event>),
}

/// Subscribers by topic.
type Subscribers = Arc<Mutex<HashMap<String, Vec<Sender<Event>>>>>;

async fn publish(subs: &Subscribers, event: Event) {
    let list = subs
        .lock()
        .await
        .get(&event.topic)
        .cloned()
        .unwrap_or_default();
    for s in list {
        // A subscriber that went away just misses the event.
        let _ = s.send(event.clone()).await;
    }
}

async fn server(session: Session) -> Result<()> {
    let subs: Subscribers = Arc::default();
    let mut requests = session.accept::<Request>().await?.ok_or("no channel")?;
    while let Some(req) = requests.recv().await? {
        match req {
            Request::Subscribe { topic, events } => {
                subs.lock().await.entry(topic).or_default().push(events);
            }
            Request::Watch { topic, reply } => {
                let (tx, rx) = channel(16);
                subs.lock().await.entry(topic).or_default().push(tx);
                reply.send(rx).await.map_err(|e| e.error)?;
            }
            Request::Publish(mut incoming) => {
                let subs = subs.clone();
                tokio::spawn(async move {
                    while let Ok(Some(e)) = incoming.recv().await {
                        publish(&subs, e).await;
                    }
                    // The publisher is done: end every subscription.
                    subs.lock().await.clear();
                });
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let listener = libchan::listen("tcp://127.0.0.1:0").await?;
    let url = listener.local_url();
    let (client, accepted) = tokio::join!(libchan::connect(&url), listener.accept());
    let (client, accepted) = (client?, accepted?);
    tokio::spawn(server(accepted));

    let requests = client.open::<Request>().await?;
    // Subscription: our Sender goes to the server.
    let (events_tx, mut subscribed) = channel::<Event>(16);
    requests
        .send(Request::Subscribe {
            topic: "builds".into(),
            events: events_tx,
        })
        .await
        .map_err(|e| e.error)?;
    // Watch: the server's Receiver comes to us.
    let (reply, mut replies) = channel::<Receiver<Event>>(1);
    requests
        .send(Request::Watch {
            topic: "builds".into(),
            reply,
        })
        .await
        .map_err(|e| e.error)?;
    let mut watched = replies.recv().await?.ok_or("no watch")?;
    // And our events go to the server, which fans them out to both.
    let (publish_tx, publish_rx) = channel::<Event>(16);
    requests
        .send(Request::Publish(publish_rx))
        .await
        .map_err(|e| e.error)?;
    for seq in 0..5 {
        publish_tx
            .send(Event {
                topic: "builds".into(),
                seq,
                text: format!("build {seq} passed"),
            })
            .await
            .map_err(|e| e.error)?;
    }
    drop(publish_tx);

    let (mut a, mut b) = (Vec::new(), Vec::new());
    while let Some(e) = subscribed.recv().await? {
        a.push(e.seq);
    }
    while let Some(e) = watched.recv().await? {
        b.push(e.seq);
    }
    println!("via our Sender (subscribe): {a:?}");
    println!("via the server's Receiver (watch): {b:?}");
    if a != [0, 1, 2, 3, 4] || b != a {
        return Err("events lost or out of order".into());
    }
    Ok(())
}
