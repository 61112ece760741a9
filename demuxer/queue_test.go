package demuxer

import "testing"

// TestRefQueue pushes and pops across the ring's wrap-around, growth and
// shrinking, checking FIFO order against a plain slice.
func TestRefQueue(t *testing.T) {
	var q refQueue
	var want []int64
	next := int64(0)
	step := func(pushes, pops int) {
		for range pushes {
			q.push(pendingRef{deadline: next})
			want = append(want, next)
			next++
		}
		for range pops {
			if got := q.front().deadline; got != want[0] {
				t.Fatalf("front %d, want %d", got, want[0])
			}
			q.pop()
			want = want[1:]
		}
		if q.len() != len(want) {
			t.Fatalf("len %d, want %d", q.len(), len(want))
		}
	}
	step(700, 500)          // head moves into the buffer
	step(1000, 0)           // wraps around, then grows while wrapped
	step(3000, 10)          // grows again
	step(0, 4000)           // nearly empty
	if len(q.buf) != 8192 { // 4,190 refs at most
		t.Errorf("before shrink: buffer %d", len(q.buf))
	}
	q.shrink()
	if len(q.buf) != minQueue {
		t.Errorf("after shrink with %d refs: buffer %d, want %d", q.len(), len(q.buf), minQueue)
	}
	step(5000, 5000+len(want)) // still in order after shrinking
	if q.len() != 0 {
		t.Errorf("len %d after popping everything", q.len())
	}
}
