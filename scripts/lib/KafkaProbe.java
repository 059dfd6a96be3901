// Asks the broker for its cluster metadata with the real Java client, retrying until a deadline.
// Run as a single-file program: java -cp '<kafka lib>/*' KafkaProbe.java <bootstrap> <seconds>
// [client.properties]  (security settings for a secured listener)
// Exit 0 once a metadata request succeeded, 1 when the deadline passed.
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class KafkaProbe {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        Properties props = new Properties();
        if (args.length > 2) {
            try (java.io.Reader in = new java.io.FileReader(args[2])) {
                props.load(in);
            }
        }
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        String last = "no attempt";
        try (Admin admin = Admin.create(props)) {
            while (System.nanoTime() < deadline) {
                try {
                    int nodes = admin.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
                    admin.listTopics().names().get(5, TimeUnit.SECONDS);
                    System.out.println("metadata ok: " + nodes + " broker(s) at " + bootstrap);
                    return;
                } catch (Exception e) {
                    last = e.getClass().getSimpleName() + ": " + e.getMessage();
                    Thread.sleep(500);
                }
            }
        }
        System.err.println("no metadata from " + bootstrap + ": " + last);
        System.exit(1);
    }
}
